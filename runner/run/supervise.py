"""Auto-resume without a person: run training in a child process and restart it after abnormal deaths."""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

from common.errors import EXIT_CRASH, EXIT_OK, EXIT_STOPPED, EXIT_TRANSIENT, NOT_RETRIED

log = logging.getLogger("runner")


def backoff_seconds(attempt: int, base: float = 2.0, cap: float = 60.0) -> float:
    """Seconds to wait before restart number `attempt` (1, 2, ...)."""
    return min(cap, base * 2 ** (attempt - 1))


def describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = " (often the out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    if code == EXIT_TRANSIENT:
        return f"exited with status {code} (a transient failure, e.g. the network)"
    return f"exited with status {code}"


def supervise(child_args: list[str], max_restarts: int, base_delay: float = 2.0) -> int:
    """Run `python child_args...`, restarting it up to max_restarts times after abnormal exits."""
    stopping = {"signal": None}
    child: subprocess.Popen | None = None

    def forward(signum, frame):
        stopping["signal"] = signum
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    restarts = 0
    while True:
        child = subprocess.Popen([sys.executable, *child_args])
        code = child.wait()
        if stopping["signal"] is not None:
            print(f"supervisor: stopped on {signal.Signals(stopping['signal']).name}; the child "
                  f"{describe_exit(code)}", flush=True)
            return EXIT_STOPPED if code in (EXIT_OK, EXIT_STOPPED) else code
        if code in NOT_RETRIED:  # done, stopped, or a problem only the user can fix
            return code
        if restarts >= max_restarts:
            print(f"supervisor: training {describe_exit(code)}; giving up after {restarts} restart(s). "
                  f"Run the same command again to continue from the latest checkpoint.", flush=True)
            return code if code > 0 else EXIT_CRASH
        restarts += 1
        delay = backoff_seconds(restarts, base_delay)
        print(f"supervisor: training {describe_exit(code)}; restart {restarts}/{max_restarts} from the latest "
              f"checkpoint in {delay:.0f} s", flush=True)
        time.sleep(delay)
