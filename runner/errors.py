"""The one error type for problems a user can fix (bad config, bad data, incompatible run)."""


class RunnerError(Exception):
    """A problem the user can fix; the message names the file or setting and the fix."""


class DataError(RunnerError):
    """The dataset cannot be used as it is (empty, too few images in a class, ...)."""


class IncompatibleRunError(RunnerError):
    """The run directory holds a run that this configuration cannot continue."""


class StopRequested(Exception):
    """SIGTERM / SIGINT arrived during a phase that keeps what it finished (scan, extraction, restore)."""

    def __init__(self, signal_name: str, phase: str):
        super().__init__(f"stopped by {signal_name} during {phase}")
        self.signal_name, self.phase = signal_name, phase
