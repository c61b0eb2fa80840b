"""The experiment handler, as a small package (see docs/interface.md for the request and result):

- policy.py: each test's class, what two runs measure, the decision (pure);
- selection.py: which tests a risk level runs, per runner (pytest, ExUnit, node), and the result's `selection`;
- slots.py: one run per experiment_id and max_experiments_concurrent, as one context manager;
- runner.py: ExperimentRunner, which sequences the phases (copy, baseline, change, measure, decide);
- errors.py: the errors an experiment can end in.

How a suite runs and is counted per language lives in genesis_pgflow/suite.py, the copy in
genesis_pgflow/workspace.py. The names below are the package's interface.
"""

from genesis_pgflow.handlers.experiments.errors import (
    ExperimentBusy,
    ExperimentIdTaken,
    ExperimentSlotsBusy,
    ExperimentTimedOut,
    ExperimentUnmeasurable,
    UnexpectedFailure,
)
from genesis_pgflow.handlers.experiments.policy import (
    TEST_CLASSES,
    Classified,
    Decision,
    Metrics,
    Recommendation,
    Status,
    TestClass,
    classify,
    decide,
    measure,
)
from genesis_pgflow.handlers.experiments.runner import (
    EXPERIMENT_LIMITS,
    SANDBOX_PYTHON,
    ExperimentRunner,
    default_python_path,
)
from genesis_pgflow.handlers.experiments.selection import DEFAULT_SELECTION, Selected, TestSelection, select_tests
from genesis_pgflow.handlers.experiments.slots import ExperimentSlots
from genesis_pgflow.suite import TestRun, parse_junit, read_report

__all__ = [
    "DEFAULT_SELECTION", "EXPERIMENT_LIMITS", "SANDBOX_PYTHON", "TEST_CLASSES", "Classified", "Decision",
    "ExperimentBusy", "ExperimentIdTaken", "ExperimentRunner", "ExperimentSlots", "ExperimentSlotsBusy",
    "ExperimentTimedOut", "ExperimentUnmeasurable", "Metrics", "Recommendation", "Selected", "Status", "TestClass",
    "TestRun", "TestSelection", "UnexpectedFailure", "classify", "decide", "default_python_path", "measure",
    "parse_junit", "read_report", "select_tests",
]
