"""What every command-line entry point shares: logging set-up and turning user errors into exit 2."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from runner.errors import RunnerError
from runner.exit_codes import EXIT_USER_ERROR


def configure_logging(debug: bool = False) -> None:
    """Timestamped INFO logs (DEBUG with --debug), without TensorFlow's chatter."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def exit_status_of(command: Callable[[], int]) -> int:
    """Run a command; a RunnerError is printed as one 'error: …' paragraph and gives exit status 2."""
    try:
        return command()
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
