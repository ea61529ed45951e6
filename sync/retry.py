"""The one retry policy of sync: exponential backoff with jitter, honouring Retry-After, bounded tries."""
from __future__ import annotations

import email.utils
import http.client
import json
import logging
import random
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from sync.errors import QuotaExceeded, TransferError

log = logging.getLogger("sync")
T = TypeVar("T")

RATE_LIMIT_REASONS = {"rateLimitExceeded", "userRateLimitExceeded"}
QUOTA_REASONS = {"storageQuotaExceeded", "quotaExceeded"}
QUOTA_ADVICE = ("the Drive account has no storage left: run `python -m sync --config FILE prune` (or lower "
                "sync.keep), empty the Drive trash, use a shared drive, or use user credentials instead of a "
                "service account (service accounts have no storage of their own). Training continues locally "
                "and the snapshot stays queued.")


def http_status(exc: BaseException) -> int | None:
    """The HTTP status carried by an API error (googleapiclient HttpError has .resp.status), else None."""
    resp = getattr(exc, "resp", None)
    status = getattr(resp, "status", None)
    return int(status) if status is not None else None


def error_reasons(exc: BaseException) -> set[str]:
    """The Google API error reasons (e.g. rateLimitExceeded) in an HTTP error's JSON body."""
    content = getattr(exc, "content", b"") or b""
    try:
        error = json.loads(content.decode("utf-8", "replace")).get("error", {})
    except (ValueError, AttributeError):
        return set()
    reasons = {e.get("reason", "") for e in error.get("errors", []) if isinstance(e, dict)}
    reasons |= {d.get("reason", "") for d in error.get("details", []) if isinstance(d, dict)}
    return reasons - {""}


def retry_after(exc: BaseException) -> float | None:
    """Seconds asked for by a Retry-After header (delta-seconds or HTTP date), else None."""
    resp = getattr(exc, "resp", None)
    value = resp.get("retry-after") if hasattr(resp, "get") else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: 429, 403 rate limits, 5xx, 408, resets, timeouts, broken TLS streams."""
    status = http_status(exc)
    if status is not None:
        return (status in (408, 429) or status >= 500
                or (status == 403 and bool(error_reasons(exc) & RATE_LIMIT_REASONS)))
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


@dataclass
class RetryPolicy:
    """Bounded tries with delays backoff_s * 2**n (capped, full jitter), or the server's Retry-After."""
    tries: int = 8
    backoff_s: float = 1.0
    max_delay_s: float = 60.0
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, exc: BaseException) -> float:
        """Seconds to wait before try number attempt+1 (attempt counts from 0)."""
        asked = retry_after(exc)
        if asked is not None:
            return min(asked, self.max_delay_s)
        ceiling = min(self.max_delay_s, self.backoff_s * (2 ** attempt))
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run fn; retry transient failures; raise TransferError (or QuotaExceeded) when it cannot succeed."""
        for attempt in range(self.tries):
            try:
                return fn()
            except Exception as exc:  # classified below; anything not transient propagates unchanged
                if http_status(exc) == 403 and error_reasons(exc) & QUOTA_REASONS:
                    raise QuotaExceeded(f"sync: {what} failed: {QUOTA_ADVICE}") from None
                if not is_transient(exc):
                    raise
                if attempt + 1 == self.tries:
                    raise TransferError(f"sync: {what} failed after {self.tries} tries ({describe(exc)}); the "
                                        f"network or the server is not answering. Training is not affected; "
                                        f"the snapshot stays queued and is retried later (raise sync.retries "
                                        f"for flaky networks).") from None
                wait = self.delay(attempt, exc)
                log.warning("%s: %s; retry %d/%d in %.1fs", what, describe(exc), attempt + 1,
                            self.tries - 1, wait)
                self.sleep(wait)
        raise AssertionError("unreachable")
