"""The errors an experiment can end in, beyond the ones shared with every handler (errors.py)."""

from __future__ import annotations

from genesis_pgflow.errors import GenesisError, PermanentError, RetryableError


class ExperimentUnmeasurable(PermanentError):
    """The test command could not run at the baseline: there is nothing to compare the change with."""

    code = "test_command_failed"


class ExperimentSlotsBusy(RetryableError):
    """Every experiment slot stayed taken until the deadline; the experiment did not start."""

    code = "experiment_slots_busy"


class ExperimentBusy(RetryableError):
    """Another consumer (or another worker of this one) is running this experiment_id right now."""

    code = "experiment_busy"


class ExperimentIdTaken(PermanentError):
    """The experiment_id belongs to another instance_id: choose another id."""

    code = "experiment_id_taken"


class UnexpectedFailure(GenesisError):
    """The experiment broke off on an unexpected error (recorded; the request is retried)."""

    code = "internal_error"


class ExperimentTimedOut(Exception):
    """Internal: the experiment ran out of time (turned into WorkflowTimeout after rollback)."""
