"""bottleneck-runner: the one entry point. Starts a run, or resumes the one in run.dir.

    python resume.py --config configs/clothing_local.toml [--set section.key=value ...]
"""
import argparse
import os
import sys

if sys.version_info < (3, 11):  # before anything that needs 3.11 (tomllib): this file parses on 3.6+
    sys.stderr.write("error: bottleneck-runner needs Python 3.11 or newer; this is Python %d.%d (%s). Install "
                     "Python 3.11+ and run resume.py with it.\n" % (sys.version_info[0], sys.version_info[1],
                                                                   sys.executable))
    sys.exit(2)

# grow GPU memory as needed instead of reserving it all at start (a notebook kernel may hold some too);
# set before TensorFlow loads, and an explicit TF_FORCE_GPU_ALLOW_GROWTH=false is respected
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

from runner.tf_quiet import set_native_log_level  # noqa: E402

set_native_log_level("--debug" in sys.argv[1:])

from common.cli import configure_logging, exit_with, run_command  # noqa: E402
from common.errors import EXIT_OK, EXIT_STOPPED, EXIT_TRANSIENT  # noqa: E402
from runner.run.config import describe_settings, load_config, to_toml  # noqa: E402  (no TensorFlow import)
from runner.run.lock import LOCK_FILE, hold_run_dir  # noqa: E402
from runner.run.rundir import RunDir  # noqa: E402
from runner.run.supervise import supervise  # noqa: E402


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
    created = _first_missing(config.run_dir)  # the top folder this run would create, or None
    try:
        with hold_run_dir(config.run_dir):  # first: a second trainer is refused before TensorFlow loads
            from runner.run.cleanup import remove_stale_temporaries
            remove_stale_temporaries(config.run_dir, config.cache_dir)
            from runner.tf_quiet import import_tensorflow
            import_tensorflow(debug)
            from runner.training.loop import StopFlag
            stop = StopFlag()
            stop.install()
            from runner.features.distribute import configure_tensorflow
            configure_tensorflow(config.train)
            from runner.job import Job
            from sync import open_sync
            sync = open_sync(config.sync, config.run_dir, config.cache_dir, run_id=config.run_dir.resolve().name)
            outcome = None
            try:
                outcome = Job(config, sync, stop).run()
            finally:
                flushed = sync.close(config.sync.flush_timeout_s)
                if outcome is not None or sync.enabled:  # "sync: off" before an error misleads: say it on success
                    print(flushed, flush=True)
    except BaseException:
        if created is not None:
            remove_if_empty(created)  # a run that failed before writing anything leaves no folder behind
        raise
    return report(outcome, RunDir(config.run_dir), flushed)


def report(outcome, run: RunDir, flushed=None) -> int:
    """Print what the job's outcome and sync's (a SyncOutcome) mean for the user and return the exit status:
    a finished run whose final snapshot is not on the remote is not done (75), whatever the training did."""
    from runner.run.results import Stopped, Unchanged
    if isinstance(outcome, Stopped):
        where = f"at step {outcome.step}: checkpoint saved" if outcome.step is not None else \
            f"during {outcome.phase}: what was done is kept"
        print(f"stopped by {outcome.signal} {where}. Run the same command to continue.", flush=True)
        return EXIT_STOPPED
    summary = outcome.summary
    status = "already finished, nothing changed" if isinstance(outcome, Unchanged) else "done"
    print(f"{status}: step {summary.global_step}, test accuracy {_percent(summary.test_accuracy)}, "
          f"validation accuracy {_percent(summary.val_accuracy)}; summary in {run.summary}", flush=True)
    if flushed is not None and flushed.enabled and not flushed.final_on_remote:
        from sync.outcome import not_on_remote_message
        model_dir = run.export if run.export.is_dir() else None
        print(f"error: {not_on_remote_message(flushed, run.path, run.config, model_dir)}", file=sys.stderr,
              flush=True)
        return EXIT_TRANSIENT
    return EXIT_OK


def _first_missing(path):
    """The outermost folder of `path` that does not exist yet (None when `path` exists)."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            return missing
        missing = folder
    return missing


def remove_if_empty(folder) -> None:
    """Delete folder if it holds no file but the run-dir lock (only empty sub-folders, or nothing)."""
    if folder.is_dir() and not any((p.is_file() or p.is_symlink()) and p.name != LOCK_FILE
                                   for p in folder.rglob("*")):
        for sub in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            sub.unlink() if sub.is_file() else sub.rmdir()
        folder.rmdir()


def _percent(value) -> str:
    return "n/a (empty split)" if value is None else f"{100 * value:.1f} %"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    configure_logging(args.debug)

    def command() -> int:
        config = load_config(args.config, args.set)
        if args.print_config:
            print(to_toml(config))
            return EXIT_OK
        if args.supervise:
            return supervise(child_arguments(argv), args.supervise)
        return train(config, args.debug)
    return run_command(command, args.debug)


if __name__ == "__main__":
    from runner.tf_quiet import skip_keras_extras
    skip_keras_extras()
    exit_with(main(sys.argv[1:]))
