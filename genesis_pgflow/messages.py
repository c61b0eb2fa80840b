"""The wire model: request payloads, messages read from pgmq, outcomes and the result envelope."""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from genesis_pgflow.errors import GenesisError, InvalidPayload, PayloadTooLarge, PermanentError, UnknownType

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


# where the daily experiment report goes (store/reports.py), for CentralCloud: written by the
# consumers, read by whoever wants the report; nothing is ever routed from it
REPORT_QUEUE = "genesis_reports"


def all_queue_names() -> list[str]:
    """Every queue the contract names: request, result and dead-letter queues, and the reports queue."""
    names: list[str] = []
    for request, (_type, results) in QUEUES.items():
        names += [request, results, dead_letter_queue(request)]
    return names + [REPORT_QUEUE]


# --- reply_to: a request's own result queue -----------------------------------------------
#
# A request may name the queue its result goes to (one per Singularity instance, so that one
# producer's pgmq.read never hides another's results). The name becomes a pgmq table name
# (`pgmq.q_<name>`, `pgmq.a_<name>`), created on first use, so it is held to a rule that keeps it
# inside the request's own family: the paired result queue itself, or `<paired result queue>_<suffix>`
# where the suffix is lowercase ASCII letters and digits in words joined by single underscores, its
# last word not `dlq`, the whole name at most PGMQ_MAX_QUEUE_NAME characters. No request can so
# name a request queue, a dead-letter queue, or any queue of another family.

# pgmq.validate_queue_name: a partitioned queue's template table `template_pgmq_q_<name>` must fit
# PostgreSQL's 63-character identifiers
PGMQ_MAX_QUEUE_NAME = 47
REPLY_TO = "reply_to"
_CONTRACT_QUEUES = frozenset(all_queue_names())
# ASCII only: no re.IGNORECASE and no \w, which would let Unicode letters (the long s, the Kelvin sign) in
_REPLY_SUFFIX = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*")


def reply_queue_family(name: str) -> str | None:
    """The request queue whose reply_to queues the name is one of, else None (the paired result
    queue itself is not a reply_to queue)."""
    for request, (_type, results) in QUEUES.items():
        suffix = name.removeprefix(f"{results}_")
        if (suffix != name and len(name) <= PGMQ_MAX_QUEUE_NAME and _REPLY_SUFFIX.fullmatch(suffix)
                and suffix.rsplit("_", 1)[-1] != "dlq" and name not in _CONTRACT_QUEUES):
            return request
    return None


def is_reply_queue(name: str) -> bool:
    return reply_queue_family(name) is not None


def _reply_to_values(message: ReadMessage) -> dict[str, Any]:
    """Where the message names a reply_to (payload field, pgmq header) and what it says there."""
    found: dict[str, Any] = {}
    for source, holder in (("payload", message.body), ("headers", message.headers)):
        if isinstance(holder, dict) and holder.get(REPLY_TO) is not None:
            found[source] = holder[REPLY_TO]
    return found


def reply_to(message: ReadMessage) -> str | None:
    """The reply_to queue a request names (payload field `reply_to`, or pgmq header `reply_to`;
    both may be given if they agree), None for its paired result queue. Raises InvalidPayload
    naming the field when the name breaks the rule, so the request fails without running and its
    result goes to the paired result queue: nothing is ever written to a queue that was refused."""
    found = _reply_to_values(message)
    if not found:
        return None
    results = result_queue(message.queue)
    values = list(found.values())
    where = " and ".join(f"the {source}" for source in found)
    details: dict[str, Any] = {"field": REPLY_TO, "source": list(found), **raw_identifiers(message.body)}
    if len(found) == 2 and values[0] != values[1]:
        raise InvalidPayload(f"reply_to: the payload says {clip(values[0], 64)!r} and the headers say "
                             f"{clip(values[1], 64)!r}; give one, or the same in both", details=details)
    name = values[0]
    if name == results:
        return None
    if not isinstance(name, str) or reply_queue_family(name) != message.queue:
        shown = clip(name, 64) if isinstance(name, str) else type(name).__name__
        raise InvalidPayload(
            f"reply_to (in {where}): {shown!r} is not a result queue this request may name; it must be "
            f"{results} or {results}_<suffix>, the suffix lowercase letters and digits joined by single "
            f"underscores (not ending in _dlq), at most {PGMQ_MAX_QUEUE_NAME} characters in all",
            details={**details, "allowed_prefix": f"{results}_", "max_length": PGMQ_MAX_QUEUE_NAME})
    return name


def queue_role(name: str) -> str | None:
    """What a queue name is in the contract: `request`, `result`, `dead_letter`, `report` or
    `reply_to` (a name the reply_to rule allows); None for a name the contract does not know."""
    if name in QUEUES:
        return "request"
    if name == REPORT_QUEUE:
        return "report"
    if name in {results for _type, results in QUEUES.values()}:
        return "result"
    if name in {dead_letter_queue(q) for q in QUEUES}:
        return "dead_letter"
    return "reply_to" if is_reply_queue(name) else None


def check_request(queue: str, body: Any, headers: Any = None) -> Payload:
    """What `genesis send` checks before it enqueues into a request queue: what the consumer will
    (the payload against its type's model, reply_to against the naming rule), and that the type is
    the queue's own. Raises InvalidPayload or UnknownType naming the field."""
    kind = QUEUES[queue][0]
    other = body.get("type") if isinstance(body, dict) else None
    if isinstance(other, str) and other in PAYLOAD_TYPES and other != kind:
        raise InvalidPayload(f"type: {other!r} is not the type of {queue} ({kind!r})", details={"field": "type"})
    payload = parse_payload(body)
    reply_to(ReadMessage(queue, 0, 0, dt.datetime.now(dt.timezone.utc), body, headers))
    return payload


def result_destination(message: ReadMessage) -> str:
    """The queue a request's result goes to: its valid reply_to, else its paired result queue
    (a refused reply_to included: its request fails with invalid_payload, answered there)."""
    try:
        return reply_to(message) or result_queue(message.queue)
    except InvalidPayload:
        return result_queue(message.queue)


# --- secrets ------------------------------------------------------------------------------

_SECRET_NAME = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential|authorization)", re.I)
REDACTED = "[redacted]"


# field names remembered, up to this length: results and payloads repeat theirs, and a name a
# request made megabytes long must not be kept by the cache
_REMEMBERED_NAME_CHARS = 64


@functools.lru_cache(maxsize=4096)
def _is_secret_short_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def is_secret_name(name: str) -> bool:
    return _is_secret_short_name(name) if len(name) <= _REMEMBERED_NAME_CHARS else bool(_SECRET_NAME.search(name))


def redact(value: Any) -> Any:
    """A copy of value with every field named like a secret replaced by a marker, and NUL
    characters (which PostgreSQL's jsonb cannot hold) replaced by U+FFFD."""
    if isinstance(value, dict):
        copy = {}
        for k, v in value.items():
            if is_secret_name(k if isinstance(k, str) else str(k)):
                v = REDACTED
            elif isinstance(v, (dict, list)) or (isinstance(v, str) and "\x00" in v):
                v = redact(v)
            copy[k.replace("\x00", "\ufffd") if isinstance(k, str) and "\x00" in k else k] = v
        return copy
    if isinstance(value, list):
        return [redact(v) if isinstance(v, (dict, list, str)) else v for v in value]
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


# a secret written as key=value, key: value or "key": "value" in free text, and a URL's password
_SECRET_PAIR = re.compile(r"""(?P<key>["']?[\w.-]*(?:api[_-]?key|token|secret|password|passwd|credential|"""
                          r"""authorization)[\w.-]*["']?\s*[:=]\s*)(?P<value>"[^"]*"|'[^']*'|[^\s,;&}\]]+)""", re.I)
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s]+@", re.I)


def scrub(text: str) -> str:
    """Free text (an error message, a log line) with the secrets it may quote replaced by the
    redaction marker: what redact() does for named fields, for text whose fields have no names."""
    def pair(match: re.Match[str]) -> str:
        if match["value"].strip("\"'").startswith(REDACTED[:-1]):
            return match[0]     # scrubbed already: scrubbing twice changes nothing
        quote = match["value"][0] if match["value"][0] in "\"'" else ""
        return f"{match['key']}{quote}{REDACTED}{quote}"

    return _URL_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}@", _SECRET_PAIR.sub(pair, text))


def safe_error(error: Any) -> Any:
    """An error object as operators see it: secrets in its details redacted, in its message scrubbed."""
    if not isinstance(error, dict):
        return error
    safe = redact(error)
    if isinstance(safe.get("message"), str):
        safe["message"] = scrub(safe["message"])
    return safe


# --- payloads -----------------------------------------------------------------------------


class Payload(BaseModel):
    """Common to every request: unknown extra fields are allowed and ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    def identifiers(self) -> dict[str, Any]:
        """The request's own identifiers, echoed in results so producers can correlate."""
        return {}


NonEmpty = Annotated[str, Field(min_length=1)]
# Identifiers are echoed in every result and recorded in indexed columns: bounded, so that a
# request can neither bloat its result nor exceed an index row.
MAX_IDENTIFIER_CHARS = 256
Identifier = Annotated[str, Field(min_length=1, max_length=MAX_IDENTIFIER_CHARS)]


class RuleUpdate(Payload):
    type: Literal["genesis_rule_update"]
    namespace: Identifier
    rule_id: Identifier
    version: int = Field(default=1, ge=1)
    confidence: float = Field(ge=0.0, le=1.0)
    rule: dict[str, Any]

    def identifiers(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "rule_id": self.rule_id, "version": self.version}


class LlmConfigUpdate(Payload):
    type: Literal["genesis_llm_config_update"]
    provider: Identifier
    complexity: Literal["simple", "medium", "complex"]
    models: list[NonEmpty] = Field(min_length=1)
    task_types: list[str] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)

    def identifiers(self) -> dict[str, Any]:
        return {"provider": self.provider, "complexity": self.complexity}


MAX_CODE_BYTES = 1024 * 1024


class CodeExecutionRequest(Payload):
    type: Literal["code_execution_request"]
    id: Identifier
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
    instance_id: Identifier
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
ID_FIELDS = ("id", "experiment_id", "instance_id", "rule_id", "namespace", "provider", "complexity")


MAX_REPORTED_PROBLEMS = 20


def _describe(error: Any) -> str:
    loc = ".".join(str(part) for part in error["loc"] if part not in PAYLOAD_TYPES) or "payload"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return f"{loc}: {message}"


def raw_identifiers(raw: Any) -> dict[str, Any]:
    """The identifiers of a body that may not validate, for correlating its failure (only those
    short enough to echo)."""
    if not isinstance(raw, dict):
        return {}
    return {k: raw[k] for k in ID_FIELDS
            if isinstance(raw.get(k), int) or (isinstance(raw.get(k), str) and len(raw[k]) <= MAX_IDENTIFIER_CHARS)}


def clip(value: Any, limit: int = 128) -> Any:
    """A value as an error may echo it: a string cut to limit characters, saying so."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}... ({len(value)} characters)"
    return value


def parse_payload(raw: Any) -> Payload:
    """Validate a message body; raise InvalidPayload or UnknownType naming what was wrong."""
    if not isinstance(raw, dict):
        raise InvalidPayload(f"payload must be a JSON object, got {type(raw).__name__}",
                             details={"field": "payload"})
    kind = raw.get("type")
    if kind is None:
        raise InvalidPayload("type: field required", details={"field": "type", **raw_identifiers(raw)})
    if not isinstance(kind, str) or kind not in PAYLOAD_TYPES:
        raise UnknownType(f"type {clip(kind)!r} has no handler; known types: {', '.join(sorted(PAYLOAD_TYPES))}",
                          details={"type": clip(kind), **raw_identifiers(raw)})
    try:
        return _PAYLOAD.validate_python(raw)
    except ValidationError as exc:
        # the first few problems only: a list of a million bad items must not make a result of megabytes
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        shown = errors[:MAX_REPORTED_PROBLEMS]
        problems = [_describe(e) for e in shown]
        fields = [".".join(str(p) for p in e["loc"] if p not in PAYLOAD_TYPES) for e in shown]
        more = f"; and {len(errors) - len(shown)} more problem(s)" if len(errors) > len(shown) else ""
        raise InvalidPayload("; ".join(problems) + more,
                             details={"fields": fields, "errors": problems, **raw_identifiers(raw)}) from None


# --- intake: each message's JSON text decoded on its own, within limits --------------------


@dataclass(frozen=True)
class IntakeLimits:
    """What a message may be before it is decoded (Settings: max_payload_bytes, max_headers_bytes,
    max_json_depth, max_number_length). PostgreSQL's jsonb accepts far more: values nested
    thousands of levels deep and numbers of thousands of digits, which Python's json cannot
    decode, and bodies of hundreds of MiB."""

    max_payload_bytes: int = 2 * 1024 * 1024
    max_headers_bytes: int = 64 * 1024
    max_depth: int = 64
    max_number_length: int = 100


# A JSON string, or the rest of the text after an unterminated one: it always matches at a quote
# and never backtracks, so stripping the strings from any text takes linear time.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\(?:.|\Z)[^"\\]*)*(?:"|\Z)', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_NUMBER_RUN = re.compile(r"[-+.0-9eE]+")
# PostgreSQL's jsonb cannot hold NUL, and a lone surrogate is not Unicode: a request holding
# either could not have its result stored.
_UNSTORABLE_CHAR = re.compile("[\x00\ud800-\udfff]")
# Where a decoded JSON text may hold one: as an escape (\u0000, \udXXX) or as the character itself.
# A text without any of these cannot (most bodies): the decoded value is then not walked.
_MAYBE_UNSTORABLE = re.compile("\\\\u(?:0000|[dD][89a-fA-F])|[\x00\ud800-\udfff]")


class _NotJson(ValueError):
    pass


def _reject_constant(token: str) -> Any:
    raise _NotJson(f"{token} is not a JSON number")


def _finite_float(token: str) -> float:
    value = float(token)
    if value in (float("inf"), float("-inf")):
        raise _NotJson(f"number {clip(token, 40)} is out of range")
    return value


# one decoder for every text (json.loads with hooks makes a new one per call)
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _nesting_depth(stripped: str) -> int:
    """The deepest nesting of arrays and objects in a JSON text whose strings were removed."""
    brackets = _NOT_BRACKET.sub("", stripped)
    return max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def _unstorable_char(value: Any) -> str | None:
    """The first character of a string (key or value) that could not be stored; no recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            found = _UNSTORABLE_CHAR.search(item)
            if found:
                return found.group()
    return None


@functools.lru_cache(maxsize=8)
def _number_run_longer_than(length: int) -> re.Pattern[str]:
    return re.compile(f"[-+.0-9eE]{{{length + 1},}}")


def _check_nesting_and_numbers(stripped: str, limits: IntakeLimits, what: str) -> None:
    """Raise InvalidPayload if a JSON text whose strings were removed nests too deep or holds too long a number."""
    depth = _nesting_depth(stripped)
    if depth > limits.max_depth:
        raise InvalidPayload(f"{what} is nested {depth} levels deep; at most {limits.max_depth} are accepted",
                             details={"field": what, "depth": depth, "limit_depth": limits.max_depth})
    longest = max(map(len, _NUMBER_RUN.findall(stripped)), default=0)
    if longest > limits.max_number_length:
        raise InvalidPayload(f"{what} holds a number of {longest} characters; at most "
                             f"{limits.max_number_length} are accepted",
                             details={"field": what, "number_length": longest,
                                      "limit_number_length": limits.max_number_length})


def decode_json(text: str, limits: IntakeLimits, *, what: str = "payload", max_bytes: int | None = None,
                size: int | None = None) -> Any:
    """The value of one JSON text, checked against the limits before it is decoded.

    Raises PayloadTooLarge (over max_bytes, by default limits.max_payload_bytes; `size` is the
    text's length in UTF-8 bytes when the caller knows it) or InvalidPayload naming the problem
    (nesting, a number, a character, bad JSON); never anything else."""
    limit = limits.max_payload_bytes if max_bytes is None else max_bytes
    try:
        if size is None:
            size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise PayloadTooLarge(f"{what} is {size} bytes of JSON; at most {limit} bytes are accepted",
                                  details={"field": what, "size_bytes": size, "limit_bytes": limit})
        # Only a text with more opening brackets than the depth allows, or a run of number
        # characters longer than a number may be (strings included in both), is measured closely.
        if (text.count("[") + text.count("{") > limits.max_depth
                or _number_run_longer_than(limits.max_number_length).search(text)):
            _check_nesting_and_numbers(_JSON_STRING.sub('""', text), limits, what)
        try:
            value = _DECODER.decode(text)
        except (ValueError, RecursionError) as exc:
            raise InvalidPayload(f"{what} is not valid JSON: {clip(str(exc), 200)}", details={"field": what}) from None
        maybe_unstorable = ("\\u" in text or not text.isascii()) and _MAYBE_UNSTORABLE.search(text)
        bad = _unstorable_char(value) if maybe_unstorable else None
        if bad is not None:
            name = "NUL (\\u0000)" if bad == "\x00" else f"a lone surrogate (\\u{ord(bad):04x})"
            raise InvalidPayload(f"{what} holds a string with {name}, which cannot be stored as JSON",
                                 details={"field": what})
        return value
    except GenesisError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a body holds, it fails alone, never the consumer
        raise InvalidPayload(f"{what} could not be decoded ({type(exc).__name__})", details={"field": what}) from None


def _too_large(what: str, size: int | None, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} is {size} bytes of JSON; at most {limit} bytes are accepted",
                           details={"field": what, "size_bytes": size, "limit_bytes": limit})


def take_in(queue: str, msg_id: int, read_ct: int, enqueued_at: dt.datetime, *, body: str | None,
            body_bytes: int | None, headers: str | None = None, headers_bytes: int | None = None,
            identifiers: str | None = None, limits: IntakeLimits) -> ReadMessage:
    """A leased message's JSON texts (None when too large to be fetched, with their size and, as
    JSON text, the identifiers its failure echoes) made a ReadMessage: whatever cannot be taken in
    becomes its `problem`, never an exception."""
    problem: GenesisError | None = None
    value: Any = None
    try:
        if body is None:
            error = _too_large("payload", body_bytes, limits.max_payload_bytes)
            if identifiers is not None:
                try:
                    error.details = {**raw_identifiers(decode_json(identifiers, limits)), **error.details}
                except InvalidPayload:
                    pass
            raise error
        value = decode_json(body, limits, size=body_bytes)
    except InvalidPayload as exc:
        problem = exc
    header_value: Any = None
    if headers is not None or headers_bytes is not None:
        try:
            if headers is None:
                raise _too_large("headers", headers_bytes, limits.max_headers_bytes)
            header_value = decode_json(headers, limits, what="headers", max_bytes=limits.max_headers_bytes,
                                       size=headers_bytes)
        except InvalidPayload as exc:
            problem = problem or exc
    return ReadMessage(queue, msg_id, read_ct, enqueued_at, value, header_value, problem)


# --- messages, outcomes and results -------------------------------------------------------


# a payload type longer than this is recorded as none (no handler has such a type anyway)
MAX_TYPE_CHARS = 128


# Made for every message: a plain dataclass, treated as a value all the same (derived with replace(),
# never changed). A frozen one's __init__ sets each field through object.__setattr__, three times the
# cost; the per-message objects' inits were an eighth of the consumer's CPU under py-spy --gil.
@dataclass
class ReadMessage:
    """A message leased from a request queue; `problem` says why its body (then None) or its
    headers could not be taken in."""

    queue: str
    msg_id: int
    read_ct: int
    enqueued_at: dt.datetime
    body: Any
    headers: Any = None
    problem: GenesisError | None = None

    @functools.cached_property      # worked out once
    def type(self) -> str | None:
        kind = self.body.get("type") if isinstance(self.body, dict) else None
        return kind if isinstance(kind, str) and len(kind) <= MAX_TYPE_CHARS else None

    @functools.cached_property
    def destination(self) -> str:
        """The queue its result goes to (result_destination)."""
        return result_destination(self)


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return redact({"code": self.code, "message": self.message, "details": self.details})


class StateWriter(Protocol):
    """What makes a Deferred's write: store.state's StateStore (its `bound` and `apply_writes`)."""

    def bound(self, tx: Any) -> StateWriter: ...

    def apply_writes(self, writes: Sequence[tuple[Any, str]]) -> Sequence[tuple[str, int]]: ...


# a plain dataclass, as ReadMessage (made for every rule update)
@dataclass
class Deferred:
    """A handler's state write, made in the completion transaction of its message instead of one of
    its own: the write, the result, the archive and the run record commit together, one transaction
    per batch, and no crash can leave a write made whose request is then retried.

    The store settles it (settle below) once the message is archived by that transaction: the
    writer makes `write` (with `workflow_id`) in the transaction, batched with the others of the
    batch, and `finish` turns the (decision, version) it answers into the result, or raises a
    PermanentError to fail the request. The writes of one batch are made in `lock_key` order, then
    message order, so that consumers completing batches at once take their locks in one order and
    several versions of one rule in a batch are decided in the order they came."""

    lock_key: str
    write: Any
    workflow_id: str
    writer: StateWriter
    finish: Callable[[tuple[str, int]], dict[str, Any]]


_WORKFLOW_IDS = random.Random()     # seeded from os.urandom once, when made


def new_workflow_id() -> str:
    """A random (version 4) UUID naming one run. Not uuid.uuid4(): its os.urandom is a system call
    that lets go of the GIL, and taking it back cost the consumer's loop up to a switch interval
    per message while the completer's thread ran Python. A workflow id must be unique, not secret."""
    h = "%032x" % (_WORKFLOW_IDS.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET)  # as uuid.UUID(int=, version=4)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# the version (4) and variant (RFC 4122) bits of a random UUID: what uuid.UUID(version=4) sets
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


@dataclass(frozen=True)
class RunStart:
    """A run still going, to be recorded as running: its message (as the read that holds it
    leased it), its workflow id and when it started."""

    message: ReadMessage
    workflow_id: str
    started_at: dt.datetime


# a plain dataclass, as ReadMessage
@dataclass
class Outcome:
    """What became of one attempt at one message; the consumer turns it into store calls.

    kind: completed (result), failed (permanent failure), retry (transient failure),
    dead_letter (transient failure on the last attempt, or too many reads). A completed outcome
    with `deferred` has its result only once the store has settled it (settle below).
    """

    message: ReadMessage
    kind: Literal["completed", "failed", "retry", "dead_letter"]
    started_at: dt.datetime
    finished_at: dt.datetime
    result: dict[str, Any] | None = None
    error: Failure | None = None
    retry_after_s: float = 0.0
    workflow_id: str = field(default_factory=lambda: new_workflow_id())
    deferred: Deferred | None = None

    @property
    def status(self) -> str:
        return "completed" if self.kind == "completed" else "failed"

    @property
    def final(self) -> bool:
        return self.kind != "retry"


def settle(outcomes: list[Outcome], tx: Any) -> list[Outcome]:
    """The outcomes with their deferred writes made in tx (see Deferred), in the same order: one
    `apply_writes` per writer and batch. A database error propagates: the transaction is lost and
    the batch is written again or one by one."""
    pending = sorted((o for o in outcomes if o.deferred is not None),
                     key=lambda o: (o.deferred.lock_key if o.deferred else "", o.message.msg_id))
    settled: dict[int, Outcome] = {}
    for _writer, group in itertools.groupby(pending, key=lambda o: id(o.deferred.writer) if o.deferred else 0):
        items = [(o, o.deferred) for o in group if o.deferred is not None]
        decisions = items[0][1].writer.bound(tx).apply_writes([(d.write, d.workflow_id) for _o, d in items])
        for (o, d), decision in zip(items, decisions, strict=True):
            try:
                result = d.finish(decision)
            except PermanentError as exc:
                settled[id(o)] = replace(o, kind="failed", deferred=None,
                                         error=Failure(exc.code, exc.message, exc.details))
            else:
                settled[id(o)] = replace(o, result=result, deferred=None)
    return [settled.get(id(o), o) for o in outcomes]


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


def request_headers(outcome: Outcome) -> Any:
    """The pgmq headers of a request as they came (a JSON object), else none."""
    headers = outcome.message.headers
    return redact(headers) if isinstance(headers, dict) else None


def dead_letter_headers(outcome: Outcome) -> dict[str, Any]:
    """What a dead letter's copy says of its original: where it was, how often it was read, and
    its own headers (restored when it is requeued)."""
    return {"original_queue": outcome.message.queue, "original_msg_id": outcome.message.msg_id,
            "attempts": outcome.message.read_ct, "request_headers": request_headers(outcome)}
