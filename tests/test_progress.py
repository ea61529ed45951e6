"""Progress stays readable for an hour: log lines never land inside a tqdm bar; line mode shows elapsed and ETA."""
from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers import REPO, child_env

BAR_WITH_LOGS = """
import logging
from common.cli import configure_logging
from runner.ui.progress import progress
configure_logging()
bar = progress(10, "training head", "step", "bar")
for step in range(10):
    bar.update()
    if step == 4:
        logging.getLogger("runner").info("checkpoint saved at head step 5")
bar.close()
logging.getLogger("runner").info("after the bar")
"""


def test_a_log_line_written_while_a_bar_is_open_gets_a_line_of_its_own():
    result = subprocess.run([sys.executable, "-c", BAR_WITH_LOGS], cwd=REPO, env=child_env(),
                            stderr=subprocess.PIPE, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # what a terminal shows: each line is what follows its last carriage return
    shown = [line.rsplit("\r", 1)[-1] for line in result.stderr.split("\n")]
    logged = [line for line in shown if "checkpoint saved" in line]
    assert logged and re.fullmatch(r"\d\d:\d\d:\d\d runner: checkpoint saved at head step 5", logged[0]), shown
    assert any(re.match(r"training head: 100%.*10/10", line) for line in shown), shown
    assert any(re.fullmatch(r"\d\d:\d\d:\d\d runner: after the bar", line) for line in shown), shown


def test_line_mode_prints_rate_elapsed_and_eta():
    from runner.ui.progress import LineProgress
    line = LineProgress(total=4000, desc="training head", unit="step", initial=1000)
    line.n, line.postfix = 1500, "loss 0.512"
    assert line.line(line.start + 50.0) == ("training head: 1500/4000 (10.0 step/s, elapsed 0:50, ETA 4:10) "
                                            "loss 0.512")
    line.n = 1300  # an hour in: 300 steps in 4000 s, 2700 to go
    assert "(0.1 step/s, elapsed 1:06:40, ETA 10:00:00)" in line.line(line.start + 4000.0)


def test_line_mode_before_any_progress_has_no_eta():
    from runner.ui.progress import LineProgress
    line = LineProgress(total=10, desc="extracting bottlenecks", unit="img")
    assert line.line(line.start + 3.0) == "extracting bottlenecks: 0/10 (0.0 img/s, elapsed 0:03, ETA ?)"


def test_exit_with_keeps_the_status_the_atexit_handlers_and_unflushed_output(tmp_path):
    marker = tmp_path / "atexit-ran"
    script = (f"import atexit, sys; sys.path.insert(0, {str(REPO)!r}); from common.cli import exit_with\n"
              f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
              "sys.stdout.write('unflushed'); sys.stderr.write('to stderr')\n"
              "exit_with(75)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=child_env())
    assert (result.returncode, result.stdout, result.stderr) == (75, "unflushed", "to stderr")
    assert marker.read_text() == "ran"
