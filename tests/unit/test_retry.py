"""Backoff and the retry/dead-letter decision are pure, so exact values can be asserted."""

from genesis_pgflow.retry import DeadLetter, RetryAfter, backoff, decide


def test_backoff_doubles_with_equal_jitter_and_is_capped():
    assert backoff(1, 2.0, 300.0, rand=lambda: 0.0) == 1.0
    assert backoff(1, 2.0, 300.0, rand=lambda: 1.0) == 2.0
    assert backoff(3, 2.0, 300.0, rand=lambda: 0.5) == 6.0      # ceiling 8: 4 + 0.5 * 4
    assert backoff(20, 2.0, 300.0, rand=lambda: 1.0) == 300.0


def test_decide_retries_until_the_last_attempt_then_dead_letters():
    assert decide(1, 3, 2.0, 300.0, rand=lambda: 0.0) == RetryAfter(1.0)
    assert decide(2, 3, 2.0, 300.0, rand=lambda: 0.0) == RetryAfter(2.0)
    verdict = decide(3, 3, 2.0, 300.0)
    assert isinstance(verdict, DeadLetter) and "attempt 3 of 3" in verdict.reason
    assert isinstance(decide(1, 1, 2.0, 300.0), DeadLetter)
