"""The one retry policy: which failures are retried, how long it waits, and that it gives up clearly."""
from __future__ import annotations

import json
import random
import socket

import httplib2
import pytest
from googleapiclient.errors import HttpError

from sync.errors import QuotaExceeded, TransferError
from sync.retry import RetryPolicy, is_transient


def http_error(status: int, reason: str = "", retry_after: str | None = None) -> HttpError:
    headers = {"status": str(status)}
    if retry_after is not None:
        headers["retry-after"] = retry_after
    body = {"error": {"code": status, "message": "m", "errors": [{"reason": reason}] if reason else []}}
    return HttpError(httplib2.Response(headers), json.dumps(body).encode())


def failing(*errors):
    """A callable that raises the given errors in turn, then returns 'ok'."""
    errors = list(errors)

    def fn():
        if errors:
            raise errors.pop(0)
        return "ok"
    return fn


def policy(**kw):
    waits = []
    return RetryPolicy(sleep=waits.append, rng=random.Random(0), **kw), waits


@pytest.mark.parametrize("error", [http_error(429), http_error(403, "rateLimitExceeded"),
                                   http_error(403, "userRateLimitExceeded"), http_error(500), http_error(502),
                                   http_error(503), ConnectionResetError(), socket.timeout(), TimeoutError(),
                                   OSError(0, "Error")])
def test_transient_failures_are_retried_until_success(error):
    p, waits = policy(tries=3)
    assert p.call(failing(error, error), "upload") == "ok"
    assert len(waits) == 2


@pytest.mark.parametrize("error", [http_error(404), http_error(400), http_error(403, "forbidden"),
                                   http_error(401), ValueError("bug"), FileNotFoundError("local file")])
def test_permanent_failures_are_not_retried(error):
    p, waits = policy(tries=5)
    with pytest.raises(type(error)):
        p.call(failing(error), "upload")
    assert waits == []
    assert not is_transient(error)


def test_retry_after_is_honoured():
    p, waits = policy(tries=3, backoff_s=0.01)
    p.call(failing(http_error(429, retry_after="7")), "upload")
    assert waits == [7.0]


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    p, waits = policy(tries=8, backoff_s=1.0, max_delay_s=10.0)
    p.call(failing(*[http_error(503)] * 7), "upload")
    for attempt, wait in enumerate(waits):
        ceiling = min(10.0, 2 ** attempt)
        assert ceiling / 2 <= wait <= ceiling
    assert len(set(waits)) == len(waits)  # jittered, not a fixed schedule


def test_gives_up_after_the_bounded_number_of_tries_with_a_clear_error():
    p, waits = policy(tries=4)
    with pytest.raises(TransferError, match=r"upload of x failed after 4 tries \(HTTP 503\).*stays queued"):
        p.call(failing(*[http_error(503)] * 10), "upload of x")
    assert len(waits) == 3


def test_storage_quota_is_not_retried_and_says_what_to_do():
    p, waits = policy(tries=4)
    with pytest.raises(QuotaExceeded) as info:
        p.call(failing(http_error(403, "storageQuotaExceeded")), "upload")
    assert waits == []
    for advice in ("prune", "shared drive", "user credentials", "Training continues"):
        assert advice in str(info.value)
