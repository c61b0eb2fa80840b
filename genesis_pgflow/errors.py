"""The one exception hierarchy: whether a failure is retried is a property of its class."""

from __future__ import annotations

from typing import Any

# the contract's exit codes (section 6): done, anything unexpected, bad usage or configuration
EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE = 0, 1, 2


class GenesisError(Exception):
    """Something went wrong in genesis_pgflow."""

    code = "error"

    def __init__(self, message: str | None = None, *, details: dict[str, Any] | None = None):
        super().__init__(message or (self.__doc__ or self.code).strip())
        self.details: dict[str, Any] = dict(details or {})

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigurationError(GenesisError):
    """The configuration is not usable."""

    code = "configuration"


class DatabaseUnavailable(ConfigurationError):
    """The database cannot be reached."""

    code = "database_unavailable"


class SchemaBehind(ConfigurationError):
    """The database schema is behind: run `genesis db upgrade`."""

    code = "schema_behind"


# --- what a handler may raise -------------------------------------------------------------


class PermanentError(GenesisError):
    """The request cannot succeed, however often it is tried."""

    code = "permanent_error"


class RetryableError(GenesisError):
    """The request failed for a passing reason and may succeed when tried again."""

    code = "retryable_error"


class InvalidPayload(PermanentError):
    """The payload is not valid."""

    code = "invalid_payload"


class PayloadTooLarge(InvalidPayload):
    """The message is larger than the configured limit."""

    code = "payload_too_large"


class PreparationFailed(PermanentError):
    """The request could not be prepared to run (an unexpected error, logged by the consumer)."""

    code = "preparation_failed"


class UnknownType(PermanentError):
    """The payload's type has no handler."""

    code = "unknown_type"


class WorkflowTimeout(PermanentError):
    """The handler ran past its timeout."""

    code = "timeout"


class MaxAttemptsExceeded(PermanentError):
    """The request failed on every one of its attempts."""

    code = "max_attempts_exceeded"


class ResultNotStorable(PermanentError):
    """The database refused to store the outcome of this request."""

    code = "result_not_storable"


class LowConfidence(PermanentError):
    """The rule's confidence is below the configured minimum."""

    code = "low_confidence"


class StaleVersion(PermanentError):
    """The rule's version is older than the active one."""

    code = "stale_version"


class UnsupportedLanguage(PermanentError):
    """No analyser for this language and analysis type is available."""

    code = "unsupported_language"


class SandboxUnavailable(PermanentError):
    """The sandbox cannot be set up on this machine, so untrusted code is not run."""

    code = "sandbox_unavailable"


class ResourceLimit(PermanentError):
    """The request went past one of its resource limits (memory, CPU time, wall time)."""

    code = "resource_limit"


class AnalyserFailed(PermanentError):
    """An analyser crashed on this request's code."""

    code = "analyser_failed"
