"""The one exit-status table of every command, and how an exception maps onto it.

| status | meaning                                                         | --supervise  |
| ------ | --------------------------------------------------------------- | ------------ |
| 0      | done                                                            | stops        |
| 1      | a crash (a bug, or a kill the OS reports as a crash)            | restarts     |
| 2      | a problem you can fix: the message names the file/setting + fix | stops        |
| 75     | transient: the network or remote failed after its retries       | restarts     |
| 130    | stopped by SIGTERM / SIGINT after saving what was done          | stops        |

A process killed by a signal (SIGKILL, the out-of-memory killer) has no status of its own; the
supervisor restarts it like a crash.
"""
from __future__ import annotations

import errno
import re

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USER_ERROR = 2
EXIT_TRANSIENT = 75     # sysexits.h EX_TEMPFAIL: "try again later"
EXIT_STOPPED = 130      # 128 + SIGINT, the shell's convention for "interrupted"

NOT_RETRIED = (EXIT_OK, EXIT_USER_ERROR, EXIT_STOPPED)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """Whether an exception says the disk (or quota) is full: an OSError, or TensorFlow's own error."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


def disk_full_message(exc: BaseException) -> str:
    """One paragraph naming the path that could not be written, for exit status 2."""
    if isinstance(exc, OSError):
        what = f"the device holding {exc.filename or 'the run directory or cache'} is full ({exc.strerror})"
    else:  # TensorFlow names the file in its message
        text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", str(exc).strip()).splitlines()[0]
        what = f"the disk is full: {text}"
    return (f"{what}. Free some space (or move run.dir / cache.dir to a bigger disk) and run the same "
            f"command: every checkpoint already saved is intact.")


def status_of(exc: Exception) -> tuple[int, str]:
    """(exit status, one-paragraph message) for an exception that ended a command."""
    from runner.errors import RunnerError
    from sync.errors import SyncError, TransferError
    if isinstance(exc, TransferError):  # the network, not the user: --supervise tries again
        return EXIT_TRANSIENT, (f"{exc} Nothing local was changed: run the same command again when the network "
                                f"is back (with --supervise N it is retried by itself).")
    if isinstance(exc, (RunnerError, SyncError)):
        return EXIT_USER_ERROR, str(exc)
    if is_disk_full(exc):
        return EXIT_USER_ERROR, disk_full_message(exc)
    return EXIT_CRASH, (f"unexpected {type(exc).__name__}: {exc}. Checkpoints already saved are intact; run "
                        f"the same command to resume, and add --debug to see the traceback if it happens again.")
