"""The one retry policy of sync, and the one place where remote failures are classified.

Transient failures (rate limits, 5xx, resets, timeouts) are retried with one backoff; permanent ones become a
RemoteError whose message names the fix. Reasons come from the legacy body (`error.errors[].reason`) and the
new one (`error.status`, `error.details[].reason`), as documented in the Drive guide "Resolve errors"
(https://developers.google.com/drive/api/guides/handle-errors). Failures that one more attempt of a whole
operation can mend (a Recover: md5 mismatch, a refused file id, a forgotten upload session, a deleted folder)
are mended by RetryPolicy.call_with_recovery within Recoveries: a limit for each kind and one total.
"""
from __future__ import annotations

import email.utils
import http.client
import json
import logging
import random
import socket
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, TypeVar

from sync.errors import IntegrityError, QuotaExceeded, RemoteError, SyncError, TransferError

log = logging.getLogger("sync")
T = TypeVar("T")

# Retried: per-user/per-project request limits refill within a minute or so (the guide: "retry using
# exponential backoff"). `quotaExceeded` names a request quota unless its message says storage: Drive's storage
# reason is `storageQuotaExceeded` ("The user's Drive storage quota has been exceeded", the guide's fix: free
# space), but a storage refusal has also been answered as `quotaExceeded` with a storage message, so the
# message decides (STORAGE_WORDS); a full Drive does not refill by waiting.
TRANSIENT_REASONS = {"rateLimitExceeded", "userRateLimitExceeded", "quotaExceeded", "sharingRateLimitExceeded",
                     "backendError", "internalError", "RATE_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED"}
RATE_REASONS = TRANSIENT_REASONS - {"backendError", "internalError"}
STORAGE_REASONS = frozenset({"storageQuotaExceeded", "teamDriveFileLimitExceeded", "numChildrenInNonRootLimitExceeded"})
STORAGE_WORDS = ("storage quota", "storage limit", "storage space")
# Who may delete in a shared drive, said the same way by every message (drive.v3.json files.delete: "If the file
# belongs to a shared drive, the user must be an `organizer` on the parent folder"; organizer = Manager).
SHARED_DRIVE_DELETE = ("deleting old snapshots needs the Manager role (Drive's `organizer`: files.delete 'the user "
                       "must be an organizer on the parent folder')")
QUOTA_ADVICE = ("the Drive account has no storage left: run `python -m sync --config FILE prune` (or lower "
                "sync.keep), empty the Drive trash (trashed files count against the quota), use a shared drive, or "
                "use user credentials instead of a service account (service accounts have no storage of their own).")
# Permanent failures: reason -> what the user should do. The first matching entry wins.
PERMANENT_ADVICE: list[tuple[frozenset[str], str]] = [
    (STORAGE_REASONS, QUOTA_ADVICE),
    (frozenset({"dailyLimitExceeded", "dailyLimitExceededUnreg"}),
     "the Google Cloud project of these credentials used up its daily Drive API quota; it resets at midnight "
     "Pacific time. Wait, or use credentials of another project (sync.credentials)."),
    (frozenset({"accessNotConfigured", "SERVICE_DISABLED"}),
     "the Drive API is not enabled in the Google Cloud project of these credentials: enable it at "
     "https://console.cloud.google.com/apis/library/drive.googleapis.com (or use Colab's own credentials)."),
    (frozenset({"domainPolicy"}),
     "your Google Workspace administrator does not let this app use Drive: ask them to allow it, or use the "
     "folder backend on a mounted Drive (sync.folder=/content/drive/MyDrive/...)."),
    (frozenset({"insufficientPermissions", "ACCESS_TOKEN_SCOPE_INSUFFICIENT", "insufficientScopes"}),
     "the credentials were not granted a Drive scope that allows this: in Colab run auth.authenticate_user() "
     "again and allow Drive access; with sync.credentials, create the file with the drive (or drive.file) scope."),
    (frozenset({"insufficientFilePermissions", "cannotDeleteFile", "teamDrivesParentLimit"}),
     "these credentials may not change this file or folder: share sync.folder with this account as an editor "
     f"(in a shared drive: Contributor or above to upload; {SHARED_DRIVE_DELETE}), or use a folder this account "
     "owns."),
    (frozenset({"cannotDownloadAbusiveFile"}),
     "Drive flagged this file as abusive or malware and refuses to serve it: delete it from the Drive folder."),
    (frozenset({"authError", "UNAUTHENTICATED"}),
     "Google refused the credentials: in Colab run auth.authenticate_user() again, or renew the file named by "
     "sync.credentials."),
]
STATUS_ADVICE = {
    400: "Drive refused the request as invalid (a sync bug, or a Drive-compatible server that differs): report "
         "it with this message.",
    401: "Google refused the credentials: in Colab run auth.authenticate_user() again, or renew the file named "
         "by sync.credentials.",
    403: "Drive denied the request: check that these credentials may write to sync.folder.",
    404: "not found: it was deleted, or these credentials cannot see it (with the drive.file scope only files "
         "this app created are visible); check sync.folder.",
    409: "Drive reports a conflict with an existing file.",
}
OAUTH_ADVICE = {
    "invalid_grant": "the refresh token was revoked or has expired",
    "invalid_scope": "the token was asked for a scope the credentials were never granted",
    "invalid_client": "the OAuth client of the credentials file is unknown or disabled",
    "unauthorized_client": "the OAuth client may not use this grant",
}


def http_status(exc: BaseException) -> int | None:
    """The HTTP status carried by an API error (googleapiclient HttpError has .resp.status), else None."""
    if isinstance(exc, RemoteError):
        return exc.status
    resp = getattr(exc, "resp", None)
    status = getattr(resp, "status", None)
    return int(status) if status is not None else None


def _error_body(exc: BaseException) -> dict:
    content = getattr(exc, "content", b"") or b""
    try:
        body = json.loads(content.decode("utf-8", "replace") if isinstance(content, bytes) else content)
        error = body.get("error", {}) if isinstance(body, dict) else {}
        return error if isinstance(error, dict) else {}
    except (ValueError, AttributeError):
        return {}


def error_messages(exc: BaseException) -> str:
    """The messages of an HTTP error's JSON body (error.message and every errors[].message), lower-cased."""
    if isinstance(exc, RemoteError):
        return str(exc).lower()
    error = _error_body(exc)
    texts = [error.get("message")] + [e.get("message") for e in error.get("errors", []) if isinstance(e, dict)]
    return " ".join(t for t in texts if isinstance(t, str)).lower()


def is_storage_full(exc: BaseException) -> bool:
    """Drive has no storage left for this account or shared drive: a storage reason, or `quotaExceeded` whose
    message speaks of storage (the user frees space; waiting does not help)."""
    reasons = error_reasons(exc)
    if reasons & STORAGE_REASONS or isinstance(exc, QuotaExceeded):
        return True
    return "quotaExceeded" in reasons and any(word in error_messages(exc) for word in STORAGE_WORDS)


def has_known_fix(exc: BaseException) -> bool:
    """A refusal whose cause and fix are known (PERMANENT_ADVICE, a full Drive): no new attempt can mend it."""
    reasons = error_reasons(exc)
    return is_storage_full(exc) or any(reasons & r for r, _ in PERMANENT_ADVICE)


def error_reasons(exc: BaseException) -> set[str]:
    """The Google API error reasons in an HTTP error's JSON body: legacy errors[].reason, new details[].reason
    and the new error.status (e.g. rateLimitExceeded, ACCESS_TOKEN_SCOPE_INSUFFICIENT, PERMISSION_DENIED)."""
    if isinstance(exc, RemoteError):
        return set(exc.reasons)
    error = _error_body(exc)
    reasons = {e.get("reason", "") for e in error.get("errors", []) if isinstance(e, dict)}
    reasons |= {d.get("reason", "") for d in error.get("details", []) if isinstance(d, dict)}
    status = error.get("status")
    if isinstance(status, str):
        reasons.add(status)
    return {r for r in reasons if isinstance(r, str)} - {""}


def retry_after(exc: BaseException) -> float | None:
    """Seconds asked for by a Retry-After header (delta-seconds or HTTP date); None if absent or malformed."""
    resp = getattr(exc, "resp", None)
    value = resp.get("retry-after") if hasattr(resp, "get") else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, parsed.timestamp() - time.time()) if parsed and parsed.tzinfo else None


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: 429, 408, 5xx, rate limits, resets, timeouts, broken TLS streams."""
    status = http_status(exc)
    if status is not None:
        reasons = error_reasons(exc)
        if has_known_fix(exc):
            return False
        return status in (408, 429) or status >= 500 or (status == 403 and bool(reasons & TRANSIENT_REASONS))
    if getattr(exc, "retryable", False):  # e.g. google-auth RefreshError from a 5xx/429 token endpoint
        return True
    network = (ConnectionError, TimeoutError, socket.timeout, ssl.SSLError, http.client.HTTPException, EOFError)
    # httplib2.ServerNotFoundError (DNS) and google-auth TransportError, matched by name to keep this module light
    if type(exc) is OSError:  # a bare socket error, e.g. TLS reporting a reset as "[Errno 0] Error"
        return True
    return isinstance(exc, network) or type(exc).__name__ in ("ServerNotFoundError", "TransportError")


def describe(exc: BaseException) -> str:
    """A short, credential-free description of a failure for logs and messages."""
    status = http_status(exc)
    if status is not None:
        reasons = ", ".join(sorted(error_reasons(exc)))
        return f"HTTP {status}" + (f" ({reasons})" if reasons else "")
    return type(exc).__name__ + (f": {exc}" if str(exc) and "token" not in str(exc).lower() else "")


def permanent_error(exc: BaseException, what: str) -> RemoteError | None:
    """The RemoteError (with the fix) for a permanent remote failure; None if exc is not a remote failure."""
    if type(exc).__name__ == "RefreshError":  # google-auth: the token endpoint refused (never show its text)
        data = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
        code = str(data.get("error", "")) if isinstance(data, dict) else ""
        why = OAUTH_ADVICE.get(code, f"the token endpoint answered {code}" if code else "the token was refused")
        return RemoteError(f"Google refused the credentials ({what}: {why}); in Colab run "
                           f"auth.authenticate_user() again, or renew the file named by sync.credentials.", 401,
                           frozenset({code} - {""}))
    status = http_status(exc)
    if status is None:
        return None
    reasons = frozenset(error_reasons(exc))
    advice = QUOTA_ADVICE if is_storage_full(exc) else next((a for r, a in PERMANENT_ADVICE if reasons & r), None)
    kind = QuotaExceeded if advice == QUOTA_ADVICE else RemoteError
    advice = advice or STATUS_ADVICE.get(status, "Drive refused the request.")
    return kind(f"{what} failed ({describe(exc)}): {advice}", status, reasons)


class Recover(Exception):
    """A failure of one attempt that a fresh attempt can mend; only call_with_recovery catches it. Control flow,
    not a user's problem: outside the ProjectError hierarchy, so one that escaped would be reported as the bug
    it is (exit 1), never as something the user must fix (2)."""
    label = "a recoverable failure"  # what kept failing, in messages
    gives_up_as: type[SyncError] = SyncError  # raised when the recoveries are spent


class Md5Mismatch(Recover):
    """The stored copy's md5 is not the local file's: send the content again (resource: the stored copy)."""
    label = "md5 mismatch"
    gives_up_as = IntegrityError

    def __init__(self, message: str, resource: dict):
        super().__init__(message)
        self.resource = resource


class StaleId(Recover):
    """Drive refused the saved pre-generated file id (400, or 409 for another file): use a new id."""
    label = "refused file id"


class SessionGone(Recover):
    """Drive refused a request of a started resumable upload session (any 4xx but the retried limits and the
    refusals with a known fix): start a new session."""
    label = "upload session gone"


class ParentGone(Recover):
    """The folder (or the file being replaced) is gone (404): look it up, or create it, again."""
    label = "folder gone"


@dataclass(frozen=True)
class Recoveries:
    """How often each kind of Recover may be mended in one operation, and the one total over all kinds.

    An operation runs at most `attempts` = 1 + total times; recoveries never wait (only RetryPolicy.call does)."""
    limits: Mapping[type[Recover], int]
    total: int

    def __post_init__(self):
        if min(self.limits.values()) < 0 or not 0 <= self.total <= sum(self.limits.values()):
            raise ValueError(f"recovery limits {self.limits} do not fit the total {self.total}")

    @property
    def attempts(self) -> int:
        """The most attempts of one operation, whatever keeps failing."""
        return 1 + self.total

    def attempts_of(self, kind: type[Recover]) -> int:
        """The attempts of one operation whose every attempt fails with kind."""
        return 1 + min(self.limits[kind], self.total)


class WorstCase(NamedTuple):
    """The most one operation costs: tries of requests sent, and seconds waited between them."""
    tries: int
    wait_s: float


@dataclass
class RetryPolicy:
    """Bounded tries with delays backoff_s * 2**n (capped at max_delay_s) with equal jitter (a delay is drawn
    from [ceiling/2, ceiling]), or the server's Retry-After (also capped).

    The budget of one request is `tries` tries and at most `worst_case_wait_s` seconds of waiting between them
    (plus each try's own socket timeout, sync.timeout_s). This is the only loop that waits and retries a
    request. call_with_recovery runs whole attempts of an operation within Recoveries; their requests each
    run under call, so one operation costs at most worst_case(requests per attempt, recoveries)."""
    tries: int = 8
    backoff_s: float = 1.0
    max_delay_s: float = 60.0
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    @property
    def worst_case_wait_s(self) -> float:
        """The longest this policy waits, in all, between the tries of one request."""
        return sum(min(self.max_delay_s, self.backoff_s * 2 ** attempt) for attempt in range(self.tries - 1))

    def worst_case(self, requests_per_attempt: int, recoveries: Recoveries | None = None) -> WorstCase:
        """The most an operation of requests_per_attempt requests costs: every attempt that recoveries allow,
        every request of each attempt taking all `tries` tries and the longest waits between them."""
        requests = (recoveries.attempts if recoveries else 1) * requests_per_attempt
        return WorstCase(requests * self.tries, requests * self.worst_case_wait_s)

    def delay(self, attempt: int, exc: BaseException) -> float:
        """Seconds to wait before try number attempt+1 (attempt counts from 0)."""
        asked = retry_after(exc)
        if asked is not None:
            return min(asked, self.max_delay_s)
        ceiling = min(self.max_delay_s, self.backoff_s * (2 ** attempt))
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run fn; retry transient failures; raise TransferError after the last try, a RemoteError (with the
        fix) for a permanent remote failure; anything else (a local bug) propagates unchanged."""
        for attempt in range(self.tries):
            try:
                return fn()
            except RemoteError:
                raise
            except Exception as exc:  # classified here, and nowhere else
                if not is_transient(exc):
                    permanent = permanent_error(exc, what)
                    if permanent is None:
                        raise
                    raise permanent from None
                if attempt + 1 == self.tries:  # the caller says what happens next
                    why = ("Drive kept refusing for its request limits, which refill within minutes (machines "
                           "on one account or project share them)" if error_reasons(exc) & RATE_REASONS
                           else "the network or the server is not answering")
                    raise TransferError(f"{what} failed after {self.tries} tries ({describe(exc)}); {why} "
                                        f"(raise sync.retries for flaky networks).") from None
                wait = self.delay(attempt, exc)
                log.warning("%s: %s; retry %d/%d in %.1fs", what, describe(exc), attempt + 1,
                            self.tries - 1, wait)
                self.sleep(wait)
        raise AssertionError("unreachable")

    def call_with_recovery(self, attempt: Callable[[], T], recoveries: Recoveries, what: str,
                           mend: Mapping[type[Recover], Callable[[Recover], None]]) -> T:
        """Run attempt until it returns; after each Recover it raises, run mend[its kind] (at once, no waiting)
        and attempt again. A kind past its limit, or recoveries past the total, raise the kind's gives_up_as
        naming `what` and what kept failing. Other exceptions propagate unchanged."""
        if set(mend) != set(recoveries.limits):
            raise ValueError(f"mend {sorted(k.__name__ for k in mend)} for recoveries of "
                             f"{sorted(k.__name__ for k in recoveries.limits)}")
        used: Counter[type[Recover]] = Counter()
        while True:
            try:
                return attempt()
            except Recover as exc:
                kind = next((k for k in recoveries.limits if isinstance(exc, k)), None)
                if kind is None:
                    raise
                used[kind] += 1
                spent = sum(used.values())
                if used[kind] > recoveries.limits[kind]:
                    raise kind.gives_up_as(f"{what} gave up after {kind.label} {used[kind]} times (at most "
                                           f"{recoveries.limits[kind]} recoveries of that kind): {exc}.") from None
                if spent > recoveries.total:
                    tally = ", ".join(f"{k.label} x{n}" for k, n in used.items())
                    raise kind.gives_up_as(f"{what} gave up after {spent} attempts ({tally}; at most "
                                           f"{recoveries.total} recoveries in all): last, {exc}.") from None
                log.warning("%s: %s; mending it (%s %d/%d, recovery %d/%d)", what, exc, kind.label, used[kind],
                            recoveries.limits[kind], spent, recoveries.total)
                mend[kind](exc)
