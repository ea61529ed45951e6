"""The one error root of every command, and the one exit-status table.

| status | meaning                                                            | --supervise |
| ------ | ------------------------------------------------------------------ | ----------- |
| 0      | done (with sync on: the final snapshot is on the remote)           | stops       |
| 1      | a crash (a bug, or a kill the OS reports as a crash)               | restarts    |
| 2      | a problem you can fix: the message names the file/setting and fix  | stops       |
| 66     | nothing to work on: no snapshot on the remote, no file classified  | stops       |
| 75     | transient: the network or remote failed after its retries (also:   | restarts    |
|        | a finished run whose final snapshot is not on the remote)          |             |
| 130    | stopped by SIGTERM / SIGINT after saving what was done             | stops       |

A process killed by a signal (SIGKILL, the out-of-memory killer) has no status of its own; the
supervisor restarts it like a crash. runner and sync both raise subclasses of `ProjectError`; each
class carries its exit status, so no layer translates one error type into another.
"""
from __future__ import annotations

import errno
import re

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USER_ERROR = 2
EXIT_NO_INPUT = 66      # sysexits.h EX_NOINPUT: "an input ... did not exist or was not readable"
EXIT_TRANSIENT = 75     # sysexits.h EX_TEMPFAIL: "try again later"
EXIT_STOPPED = 130      # 128 + SIGINT, the shell's convention for "interrupted"

NOT_RETRIED = (EXIT_OK, EXIT_USER_ERROR, EXIT_NO_INPUT, EXIT_STOPPED)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class ProjectError(Exception):
    """A problem the user can act on; the message names the file or setting and the fix. `origin` (e.g. "sync")
    is put before the message once, where it is shown, never into the message itself."""
    exit_status = EXIT_USER_ERROR
    origin = ""

    def shown(self) -> str:
        """The message as a user reads it: with its origin in front."""
        return f"{self.origin}: {self}" if self.origin else str(self)


class NothingToDo(ProjectError):
    """What the command needs is not there (no snapshot on the remote, no file could be classified)."""
    exit_status = EXIT_NO_INPUT


class TransientError(ProjectError):
    """The network or a remote still failed after the retry policy's last try: worth running again later."""
    exit_status = EXIT_TRANSIENT


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


def status_of(exc: BaseException) -> tuple[int, str]:
    """(exit status, one-paragraph message) for an exception that ended a command."""
    if isinstance(exc, TransientError):
        return exc.exit_status, (f"{exc.shown()} Nothing was lost: run the same command "
                                 f"again when the network is back (with --supervise N it is retried by itself).")
    if isinstance(exc, ProjectError):
        return exc.exit_status, exc.shown()
    if is_disk_full(exc):
        return EXIT_USER_ERROR, disk_full_message(exc)
    return EXIT_CRASH, (f"unexpected {type(exc).__name__}: {exc}. Checkpoints already saved are intact; run "
                        f"the same command to resume, and add --debug to see the traceback if it happens again.")
