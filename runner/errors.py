"""The one error type for problems a user can fix (bad config, bad data, incompatible run)."""


class RunnerError(Exception):
    """A problem the user can fix; the message names the file or setting and the fix."""


class DataError(RunnerError):
    """The dataset cannot be used as it is (empty, too few images in a class, ...)."""


class IncompatibleRunError(RunnerError):
    """The run directory holds a run that this configuration cannot continue."""
