"""The runner's errors: problems a user can fix (bad config, bad data, incompatible run), all under the one
project root (common/errors.py), which carries each one's exit status."""
from common.errors import NothingToDo, ProjectError


class RunnerError(ProjectError):
    """A problem the user can fix; the message names the file or setting and the fix."""


class DataError(RunnerError):
    """The dataset cannot be used as it is (empty, too few images in a class, ...)."""


class IncompatibleRunError(RunnerError):
    """The run directory holds a run that this configuration cannot continue."""


class NothingClassified(RunnerError, NothingToDo):
    """None of the files given to classify could be classified (each one's reason was printed)."""


class StopRequested(BaseException):
    """SIGTERM / SIGINT arrived during a phase that keeps what it finished (scan, extraction, restore); a
    BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, signal_name: str, phase: str):
        super().__init__(f"stopped by {signal_name} during {phase}")
        self.signal_name, self.phase = signal_name, phase
