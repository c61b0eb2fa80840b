"""Fixtures shared by the unit tests that run code in the real sandbox."""

from __future__ import annotations

import pytest

from genesis_pgflow.sandbox import Sandbox


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    """The real sandbox; the test is skipped, saying why, where bubblewrap cannot run (test_sandbox.py
    has a stricter one of its own that fails instead)."""
    sandbox = Sandbox()
    if not sandbox.available:
        pytest.skip("the sandbox (bubblewrap) is not available here")
    return sandbox
