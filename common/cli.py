"""What every command-line entry point shares: logging set-up, and one way to end with an exit status."""
from __future__ import annotations

import gc
import logging
import sys
import traceback
from typing import Callable

from common.errors import status_of

QUIET_LOGGERS = ("absl", "tensorflow", "googleapiclient", "google_auth_httplib2", "urllib3")


def configure_logging(debug: bool = False) -> None:
    """Timestamped INFO logs (DEBUG with --debug), without the chatter of TensorFlow and Google's clients."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_command(command: Callable[[], int], debug: bool = False) -> int:
    """Run a command and return its exit status; an exception that ends it is printed as one `error: ...`
    paragraph (with the traceback under --debug) and mapped to the status of the table in common/errors.py.
    Text the terminal's encoding cannot show (a class named "Äpfel" under an ASCII locale) is escaped, never
    a crash."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        return command()
    except Exception as e:  # noqa: BLE001 - every failure gets a status from the one table
        if debug:
            traceback.print_exc()
        code, message = status_of(e)
        print(f"error: {message}", file=sys.stderr, flush=True)
        return code


def exit_with(status: int) -> None:
    """End the process with `status`, skipping the interpreter's garbage collections of TensorFlow's many
    long-lived objects at shutdown (about 0.7 s of every exit here): garbage is collected once, then the rest
    is frozen out of the final collections. atexit handlers, finalizers and stream flushes still run."""
    gc.collect()
    gc.freeze()
    sys.exit(status)
