"""bottleneck-runner: the one entry point. Starts a run, or resumes the one in run.dir.

    python resume.py --config configs/clothing_local.toml [--set section.key=value ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# grow GPU memory as needed instead of reserving it all at start (a notebook kernel may hold some too);
# set before TensorFlow loads, and an explicit TF_FORCE_GPU_ALLOW_GROWTH=false is respected
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

from runner.cli import EXIT_USER_ERROR, configure_logging  # noqa: E402
from runner.config import describe_settings, load_config, to_toml  # noqa: E402  (no TensorFlow import)
from runner.errors import RunnerError  # noqa: E402
from runner.rundir import RunDir  # noqa: E402
from runner.supervise import EXIT_STOPPED, supervise  # noqa: E402
from sync.errors import SyncError  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="resume.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an image classifier on cached bottlenecks; the same command starts and resumes.",
        epilog="settings (TOML [section] key = value, or --set section.key=value):\n" + describe_settings())
    parser.add_argument("--config", help="TOML file with the run's settings (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting; repeatable")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    parser.add_argument("--supervise", type=int, default=0, metavar="N",
                        help="run training in a child process and restart it up to N times if it dies")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return parser.parse_args(argv)


def child_arguments(argv: list[str]) -> list[str]:
    """The same command line without --supervise, for the supervised child."""
    out, skip = [sys.argv[0]], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--supervise":
            skip = True
        elif not arg.startswith("--supervise="):
            out.append(arg)
    return out


def train(config, debug: bool) -> int:
    """Run (or resume) the job; returns the exit status."""
    from runner.distribute import configure_tensorflow
    configure_tensorflow(config.train)
    from runner.job import Job
    from runner.train import StopFlag
    from sync import open_sync

    stop = StopFlag()
    stop.install()
    created = _first_missing(config.run_dir)  # the top folder this run would create, or None
    try:
        sync = open_sync(config.sync, config.run_dir, config.cache_dir, run_id=config.run_dir.name)
        try:
            summary = Job(config, sync, stop).run()
        finally:
            print(sync.close(config.sync.flush_timeout_s), flush=True)
    except BaseException:
        if created is not None:
            remove_if_empty(created)  # a run that failed before writing anything leaves no folder behind
        raise
    if "stopped_by" in summary:
        print(f"stopped by {summary['stopped_by']} at step {summary['global_step']}: checkpoint saved. "
              f"Run the same command to continue.", flush=True)
        return EXIT_STOPPED
    status = "already finished, nothing changed" if summary.get("unchanged") else "done"
    print(f"{status}: step {summary['global_step']}, test accuracy {_percent(summary['test_accuracy'])}, "
          f"validation accuracy {_percent(summary['val_accuracy'])}; summary in {RunDir(config.run_dir).summary}",
          flush=True)
    return 0


def _first_missing(path):
    """The outermost folder of `path` that does not exist yet (None when `path` exists)."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            return missing
        missing = folder
    return missing


def remove_if_empty(folder) -> None:
    """Delete folder if it holds no file (only empty sub-folders, or nothing)."""
    if folder.is_dir() and not any(p.is_file() or p.is_symlink() for p in folder.rglob("*")):
        for sub in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            sub.rmdir()
        folder.rmdir()


def _percent(value) -> str:
    return "n/a (empty split)" if value is None else f"{100 * value:.1f} %"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    configure_logging(args.debug)
    try:
        config = load_config(args.config, args.set)
        if args.print_config:
            print(to_toml(config))
            return 0
        if args.supervise:
            return supervise(child_arguments(argv), args.supervise)
        return train(config, args.debug)
    except (RunnerError, SyncError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except Exception as e:  # a crash: say so in one paragraph; the checkpoints on disk are intact
        if args.debug:
            traceback.print_exc()
        print(f"error: unexpected {type(e).__name__}: {e}. Checkpoints already saved are intact; run the same "
              f"command to resume, and add --debug to see the traceback if it happens again.",
              file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
