"""How a command-line entry point imports TensorFlow: without its native start-up chatter on the terminal
(shown with --debug), and without the extras keras would import for nothing.

TF_CPP_MIN_LOG_LEVEL must be set before TensorFlow loads, and it does not cover the lines absl prints
before its logging is initialised ("oneDNN custom operations are on", "Could not find cuda drivers"),
so those are caught by pointing file descriptor 2 at a temporary file while TensorFlow is imported.
Anything else written there meanwhile (a real error) is passed on.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile

NATIVE_LOG_LINE = re.compile(r"^([IWE]\d{4} [\d:.]+ +\d+ \S+:\d+\]|WARNING: All log messages before absl::InitializeLog"
                             r"|To enable the following instructions: .*rebuild TensorFlow)")


KERAS_EXTRAS = ("sklearn", "IPython")  # imported by keras, when installed, for its scikit-learn wrappers and notebook display


def skip_keras_extras() -> None:
    """Keep keras from importing scikit-learn (scipy.stats with it) and IPython: about 1 s of every start, a
    quarter of TensorFlow's import. keras imports them whenever they are installed (Colab has both) for its
    scikit-learn wrappers and notebook display, which the runner never uses. For resume.py's `__main__` only,
    before TensorFlow loads: never in a notebook kernel or a test process, which may use them."""
    for name in KERAS_EXTRAS:
        sys.modules.setdefault(name, None)  # None: `import name` raises ImportError, which keras expects


def set_native_log_level(debug: bool) -> None:
    """Silence TensorFlow's C++ logging unless debugging; call before TensorFlow is imported."""
    if not debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def import_tensorflow(debug: bool = False):
    """Import TensorFlow with its native start-up lines hidden unless debug; returns the module."""
    set_native_log_level(debug)
    if debug or "tensorflow" in sys.modules:
        import tensorflow
        return tensorflow
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not NATIVE_LOG_LINE.match(line)))
            sys.stderr.flush()
    return tensorflow
