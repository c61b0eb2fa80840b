"""The wire model: request payloads, messages read from pgmq, outcomes and the result envelope."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from genesis_pgflow.errors import InvalidPayload, UnknownType

# request queue -> (payload type, result queue)
QUEUES: dict[str, tuple[str, str]] = {
    "genesis_rule_updates": ("genesis_rule_update", "genesis_rule_updates_results"),
    "genesis_llm_config_updates": ("genesis_llm_config_update", "genesis_llm_config_updates_results"),
    "code_execution_requests": ("code_execution_request", "code_execution_results"),
    "genesis_experiment_requests": ("genesis_experiment_request", "genesis_experiment_results"),
}
REQUEST_QUEUES = tuple(QUEUES)


def result_queue(request_queue: str) -> str:
    return QUEUES[request_queue][1]


def dead_letter_queue(request_queue: str) -> str:
    return f"{request_queue}_dlq"


def all_queue_names() -> list[str]:
    """Every queue the contract names: request, result and dead-letter queues."""
    names: list[str] = []
    for request, (_type, results) in QUEUES.items():
        names += [request, results, dead_letter_queue(request)]
    return names


# --- secrets ------------------------------------------------------------------------------

_SECRET_NAME = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential|authorization)", re.I)
REDACTED = "[redacted]"


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact(value: Any) -> Any:
    """A copy of value with every field named like a secret replaced by a marker, and NUL
    characters (which PostgreSQL's jsonb cannot hold) replaced by U+FFFD."""
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: (REDACTED if is_secret_name(str(k)) else redact(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


# --- payloads -----------------------------------------------------------------------------


class Payload(BaseModel):
    """Common to every request: unknown extra fields are allowed and ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    def identifiers(self) -> dict[str, Any]:
        """The request's own identifiers, echoed in results so producers can correlate."""
        return {}


NonEmpty = Annotated[str, Field(min_length=1)]


class RuleUpdate(Payload):
    type: Literal["genesis_rule_update"]
    namespace: NonEmpty
    rule_id: NonEmpty
    version: int = Field(default=1, ge=1)
    confidence: float = Field(ge=0.0, le=1.0)
    rule: dict[str, Any]

    def identifiers(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "rule_id": self.rule_id, "version": self.version}


class LlmConfigUpdate(Payload):
    type: Literal["genesis_llm_config_update"]
    provider: NonEmpty
    complexity: Literal["simple", "medium", "complex"]
    models: list[NonEmpty] = Field(min_length=1)
    task_types: list[str] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)

    def identifiers(self) -> dict[str, Any]:
        return {"provider": self.provider, "complexity": self.complexity}


MAX_CODE_BYTES = 1024 * 1024


class CodeExecutionRequest(Payload):
    type: Literal["code_execution_request"]
    id: NonEmpty
    code: str
    language: NonEmpty
    analysis_type: Literal["quality", "security", "linting", "testing"]
    timeout_ms: int | None = Field(default=None, gt=0)

    @field_validator("code")
    @classmethod
    def _code_size(cls, code: str) -> str:
        size = len(code.encode("utf-8"))
        if size > MAX_CODE_BYTES:
            raise ValueError(f"is {size} bytes; at most {MAX_CODE_BYTES} bytes (1 MiB) are allowed")
        return code

    def identifiers(self) -> dict[str, Any]:
        return {"id": self.id}


class FileChange(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    path: NonEmpty
    content: str


class Changes(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    files: list[FileChange] | None = None
    patch: str | None = None

    @field_validator("patch")
    @classmethod
    def _patch_not_blank(cls, patch: str | None) -> str | None:
        if patch is not None and not patch.strip():
            raise ValueError("is empty")
        return patch

    def model_post_init(self, _context: Any) -> None:
        if (self.files is None) == (self.patch is None):
            raise ValueError("give exactly one of 'files' or 'patch'")


class ExperimentRequest(Payload):
    type: Literal["genesis_experiment_request"]
    experiment_id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    instance_id: NonEmpty
    experiment_type: NonEmpty
    description: str
    risk_level: Literal["low", "medium", "high"]
    repo: NonEmpty
    base_ref: NonEmpty = "HEAD"
    changes: Changes
    test_command: list[NonEmpty] | None = Field(default=None, min_length=1)
    timeout_ms: int | None = Field(default=None, gt=0)

    def identifiers(self) -> dict[str, Any]:
        return {"experiment_id": self.experiment_id, "instance_id": self.instance_id}


RequestPayload = Annotated[
    RuleUpdate | LlmConfigUpdate | CodeExecutionRequest | ExperimentRequest,
    Field(discriminator="type"),
]
_PAYLOAD = TypeAdapter(RequestPayload)
PAYLOAD_TYPES = {kind for kind, _results in QUEUES.values()}
_ID_FIELDS = ("id", "experiment_id", "instance_id", "rule_id", "namespace", "provider", "complexity")


def _describe(error: Any) -> str:
    loc = ".".join(str(part) for part in error["loc"] if part not in PAYLOAD_TYPES) or "payload"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return f"{loc}: {message}"


def raw_identifiers(raw: Any) -> dict[str, Any]:
    """The identifiers of a body that may not validate, for correlating its failure."""
    if not isinstance(raw, dict):
        return {}
    return {k: raw[k] for k in _ID_FIELDS if isinstance(raw.get(k), (str, int))}


def parse_payload(raw: Any) -> Payload:
    """Validate a message body; raise InvalidPayload or UnknownType naming what was wrong."""
    if not isinstance(raw, dict):
        raise InvalidPayload(f"payload must be a JSON object, got {type(raw).__name__}",
                             details={"field": "payload"})
    identifiers = raw_identifiers(raw)
    kind = raw.get("type")
    if kind is None:
        raise InvalidPayload("type: field required", details={"field": "type", **identifiers})
    if not isinstance(kind, str) or kind not in PAYLOAD_TYPES:
        raise UnknownType(f"type {kind!r} has no handler; known types: {', '.join(sorted(PAYLOAD_TYPES))}",
                          details={"type": kind, **identifiers})
    try:
        return _PAYLOAD.validate_python(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors(include_url=False, include_input=False)]
        fields = [".".join(str(p) for p in e["loc"] if p not in PAYLOAD_TYPES) for e in exc.errors()]
        raise InvalidPayload("; ".join(problems),
                             details={"fields": fields, "errors": problems, **identifiers}) from None


# --- messages, outcomes and results -------------------------------------------------------


@dataclass(frozen=True)
class ReadMessage:
    """A message leased from a request queue."""

    queue: str
    msg_id: int
    read_ct: int
    enqueued_at: dt.datetime
    body: Any
    headers: Any = None

    @property
    def type(self) -> str | None:
        return self.body.get("type") if isinstance(self.body, dict) and isinstance(self.body.get("type"), str) else None


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return redact({"code": self.code, "message": self.message, "details": self.details})


@dataclass(frozen=True)
class Outcome:
    """What became of one attempt at one message; the consumer turns it into store calls.

    kind: completed (result), failed (permanent failure), retry (transient failure),
    dead_letter (transient failure on the last attempt, or too many reads).
    """

    message: ReadMessage
    kind: Literal["completed", "failed", "retry", "dead_letter"]
    started_at: dt.datetime
    finished_at: dt.datetime
    result: dict[str, Any] | None = None
    error: Failure | None = None
    retry_after_s: float = 0.0
    workflow_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def status(self) -> str:
        return "completed" if self.kind == "completed" else "failed"

    @property
    def final(self) -> bool:
        return self.kind != "retry"


def envelope(outcome: Outcome, consumer: str) -> dict[str, Any]:
    """The result message the contract's section 4 promises, secrets redacted."""
    msg = outcome.message
    execution_ms = (outcome.finished_at - outcome.started_at).total_seconds() * 1000.0
    return {
        "workflow_id": outcome.workflow_id,
        "request": {"queue": msg.queue, "msg_id": msg.msg_id, "type": msg.type, "attempt": msg.read_ct},
        "status": outcome.status,
        "result": redact(outcome.result) if outcome.kind == "completed" else None,
        "error": outcome.error.as_json() if outcome.error and outcome.kind != "completed" else None,
        "started_at": outcome.started_at.isoformat(timespec="microseconds"),
        "finished_at": outcome.finished_at.isoformat(timespec="microseconds"),
        "execution_ms": round(execution_ms, 3),
        "consumer": consumer,
    }

