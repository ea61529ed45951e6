"""The one retry policy: which failures are retried, how long it waits, and that it gives up clearly."""
from __future__ import annotations

import json
import random
import socket

import httplib2
import pytest
from googleapiclient.errors import HttpError

from sync.errors import QuotaExceeded, RemoteError, TransferError
from sync.retry import RetryPolicy, error_reasons, is_transient


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
                                   http_error(401)])
def test_permanent_http_failures_are_not_retried_and_become_one_remote_error(error):
    p, waits = policy(tries=5)
    with pytest.raises(RemoteError) as info:
        p.call(failing(error), "upload")
    assert waits == [] and not is_transient(error)
    assert info.value.status == error.resp.status and info.value.shown().startswith("sync: upload failed (HTTP ")


@pytest.mark.parametrize("error", [ValueError("bug"), FileNotFoundError("local file")])
def test_local_failures_propagate_unchanged(error):
    p, waits = policy(tries=5)
    with pytest.raises(type(error)):
        p.call(failing(error), "upload")
    assert waits == []


def new_format_error(status: int, grpc_status: str, reason: str) -> HttpError:
    """An error body of the new format only: error.status and details[] ErrorInfo, no legacy errors[]."""
    body = {"error": {"code": status, "message": "m", "status": grpc_status,
                      "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason}]}}
    return HttpError(httplib2.Response({"status": str(status)}), json.dumps(body).encode())


PERMANENT = [  # (error, words the advice must contain): the Drive guide's reasons, legacy and new format
    (http_error(403, "dailyLimitExceeded"), "daily Drive API quota"),
    (http_error(403, "accessNotConfigured"), "enable it"),
    (new_format_error(403, "PERMISSION_DENIED", "SERVICE_DISABLED"), "enable it"),
    (http_error(403, "domainPolicy"), "Workspace administrator"),
    (http_error(403, "insufficientPermissions"), "scope"),
    (new_format_error(403, "PERMISSION_DENIED", "ACCESS_TOKEN_SCOPE_INSUFFICIENT"), "scope"),
    (http_error(403, "insufficientFilePermissions"), "share sync.folder"),
    (http_error(403, "cannotDownloadAbusiveFile"), "delete it"),
    (http_error(404, "notFound"), "check sync.folder"),
    (http_error(400, "badRequest"), "report it"),
]


@pytest.mark.parametrize("error,advice", PERMANENT, ids=[sorted(error_reasons(e))[-1] for e, _ in PERMANENT])
def test_every_known_permanent_drive_error_names_its_fix_without_retrying(error, advice):
    p, waits = policy(tries=5)
    with pytest.raises(RemoteError, match=advice) as info:
        p.call(failing(error), "upload")
    assert waits == [] and not isinstance(info.value, QuotaExceeded)


@pytest.mark.parametrize("error", [http_error(403, "quotaExceeded"), http_error(403, "sharingRateLimitExceeded"),
                                   new_format_error(429, "RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED"),
                                   http_error(408)])
def test_request_quotas_are_retried_and_are_not_called_storage(error):
    p, waits = policy(tries=3)
    assert p.call(failing(error), "upload") == "ok" and len(waits) == 1
    with pytest.raises(TransferError) as info:
        p.call(failing(*[error] * 5), "upload")
    assert "no storage" not in str(info.value)


@pytest.mark.parametrize("value", ["soon", "Mon, 99 Foo 2024 ::", "", "1e999999", "Wed, 21 Oct 2015 07:28:00"])
def test_a_malformed_retry_after_falls_back_to_the_backoff(value):
    p, waits = policy(tries=3, backoff_s=0.5)
    assert p.call(failing(http_error(429, retry_after=value)), "upload") == "ok"
    assert len(waits) == 1 and 0 <= waits[0] <= p.max_delay_s


def test_refused_refresh_names_the_oauth_reason_and_no_token():
    from google.auth.exceptions import RefreshError
    p, waits = policy(tries=3)
    error = RefreshError("invalid_scope: bad scope for 1//r3fr3sh", {"error": "invalid_scope"})
    with pytest.raises(RemoteError, match="scope the credentials were never granted") as info:
        p.call(failing(error), "listing")
    assert "r3fr3sh" not in str(info.value) and waits == []


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
    with pytest.raises(TransferError, match=r"upload of x failed after 4 tries \(HTTP 503\).*sync.retries") as info:
        p.call(failing(*[http_error(503)] * 10), "upload of x")
    assert "queued" not in str(info.value), "the retry policy does not know whether an upload or a restore failed"
    assert len(waits) == 3


def test_storage_quota_is_not_retried_and_says_what_to_do():
    p, waits = policy(tries=4)
    with pytest.raises(QuotaExceeded) as info:
        p.call(failing(http_error(403, "storageQuotaExceeded")), "upload")
    assert waits == []
    for advice in ("prune", "shared drive", "user credentials", "trash"):
        assert advice in str(info.value)


def test_the_stated_budget_is_what_the_policy_waits_at_most_with_equal_jitter():
    class Highest(random.Random):
        def uniform(self, a, b):
            return b
    waits = []
    policy = RetryPolicy(tries=8, backoff_s=1.0, max_delay_s=10.0, sleep=waits.append, rng=Highest())
    with pytest.raises(TransferError):
        policy.call(lambda: (_ for _ in ()).throw(ConnectionResetError("reset")), "sending")
    assert len(waits) == policy.tries - 1 and sum(waits) == pytest.approx(policy.worst_case_wait_s)
    low = RetryPolicy(tries=8, backoff_s=1.0, max_delay_s=10.0, rng=random.Random(0))
    for attempt in range(7):  # equal jitter: never under half the ceiling, never over it
        ceiling = min(low.max_delay_s, low.backoff_s * 2 ** attempt)
        assert ceiling / 2 <= low.delay(attempt, ConnectionResetError()) <= ceiling
