"""The one recovery runner (RetryPolicy.call_with_recovery) with plain failures: limits, the total, no waiting,
and the worst case it states."""
from __future__ import annotations

import random

import pytest

from sync.errors import IntegrityError, SyncError
from sync.retry import Md5Mismatch, ParentGone, Recover, Recoveries, RetryPolicy, SessionGone, StaleId

KINDS = (Md5Mismatch, StaleId, SessionGone, ParentGone)
LIMITS = Recoveries({Md5Mismatch: 2, StaleId: 1, SessionGone: 2, ParentGone: 1}, total=4)


def failure(kind: type[Recover]) -> Recover:
    return kind("stored copy differs", {"id": "x"}) if kind is Md5Mismatch else kind(f"{kind.__name__} happened")


def scripted(*kinds):
    """An attempt that raises the given kinds in turn, then returns 'done'; and the log of what was mended."""
    todo, mended = list(kinds), []

    def attempt():
        if todo:
            raise failure(todo.pop(0))
        return "done"
    return attempt, mended, {k: (lambda exc, k=k: mended.append(k)) for k in KINDS}


def policy():
    waits = []
    return RetryPolicy(tries=3, backoff_s=1.0, sleep=waits.append, rng=random.Random(0)), waits


def test_each_failure_is_mended_once_in_order_and_nothing_waits():
    p, waits = policy()
    kinds = (SessionGone, Md5Mismatch, StaleId, SessionGone)  # four recoveries: the total, each within its limit
    attempt, mended, mend = scripted(*kinds)
    assert p.call_with_recovery(attempt, LIMITS, "uploading f.bin", mend) == "done"
    assert mended == list(kinds) and waits == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_kind_that_keeps_failing_gives_up_after_its_limit_naming_what_and_why(kind):
    p, _ = policy()
    attempt, mended, mend = scripted(*[kind] * 10)
    with pytest.raises(SyncError, match=rf"uploading f\.bin gave up after {kind.label} "
                                        rf"{LIMITS.limits[kind] + 1} times") as info:
        p.call_with_recovery(attempt, LIMITS, "uploading f.bin", mend)
    assert len(mended) == LIMITS.limits[kind] == LIMITS.attempts_of(kind) - 1
    assert isinstance(info.value, kind.gives_up_as) and not isinstance(info.value, Recover)
    assert isinstance(info.value, IntegrityError) == (kind is Md5Mismatch)


def test_mixed_kinds_each_within_its_limit_count_against_the_one_total():
    p, _ = policy()
    attempt, mended, mend = scripted(StaleId, SessionGone, SessionGone, Md5Mismatch, ParentGone, Md5Mismatch)
    with pytest.raises(SyncError, match=r"gave up after 5 attempts \(refused file id x1, upload session gone x2, "
                                        r"md5 mismatch x1, folder gone x1; at most 4 recoveries in all\)"):
        p.call_with_recovery(attempt, LIMITS, "uploading f.bin", mend)
    assert len(mended) == LIMITS.total == LIMITS.attempts - 1


def test_other_failures_and_unlisted_kinds_propagate_unmended():
    p, _ = policy()
    only_md5 = Recoveries({Md5Mismatch: 1}, total=1)
    for error in (ValueError("a bug"), SessionGone("not mended by this operation")):
        mended = []

        def attempt():
            raise error
        with pytest.raises(type(error)):
            p.call_with_recovery(attempt, only_md5, "x", {Md5Mismatch: mended.append})
        assert mended == []


def test_limits_that_cannot_be_reached_are_refused():
    with pytest.raises(ValueError):
        Recoveries({Md5Mismatch: 1, StaleId: 1}, total=3)
    with pytest.raises(ValueError):
        RetryPolicy().call_with_recovery(lambda: 1, LIMITS, "x", {Md5Mismatch: print})


class Highest(random.Random):
    """Every jittered delay at its ceiling: the longest waits the policy can draw."""
    def uniform(self, a, b):
        return b


@pytest.mark.parametrize("requests", [1, 3])
def test_the_stated_worst_case_is_what_an_operation_can_cost_at_most(requests):
    """Every request of every attempt fails until its last try, every attempt but the last needs mending:
    the tries sent and the seconds waited are exactly RetryPolicy.worst_case."""
    waits = []
    p = RetryPolicy(tries=4, backoff_s=1.0, max_delay_s=3.0, sleep=waits.append, rng=Highest())
    sent, attempts = [], []

    def request():
        sent.append(1)
        if len(sent) % p.tries:
            raise ConnectionResetError("reset")

    def attempt():
        attempts.append(1)
        for _ in range(requests):
            p.call(request, "a request")
        if len(attempts) < LIMITS.attempts:
            raise failure((SessionGone, Md5Mismatch, SessionGone, StaleId)[len(attempts) - 1])
        return "done"
    assert p.call_with_recovery(attempt, LIMITS, "x", {k: lambda exc: None for k in KINDS}) == "done"
    worst = p.worst_case(requests, LIMITS)
    assert len(sent) == worst.tries == LIMITS.attempts * requests * p.tries
    assert sum(waits) == pytest.approx(worst.wait_s)
