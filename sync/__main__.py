"""python -m sync --config FILE [--set sync.key=value ...] list|pull|push|prune"""
from __future__ import annotations

import argparse
import sys
import time

from common.cli import configure_logging, exit_with, run_command
from sync import STATE_DIR, open_sync
from sync.config import load_toml
from common.errors import EXIT_OK
from sync.errors import NoSnapshots, NotSent, SyncError
from sync.remote import list_snapshots, prune, read_pointer, restore_candidates, snapshot_on_remote
from sync.snapshot import local_content

def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def cmd_list(sync, args) -> int:
    """Print the remote snapshots: step, val accuracy, size, age."""
    snaps = list_snapshots(sync.backend)
    pointer = read_pointer(sync.backend)
    if not snaps:
        raise NoSnapshots(f"no snapshots in {sync.backend.description} yet (a run hands one over at its "
                          f"first checkpoint; check sync.folder: the same value the training run used).")
    scored = [s for s in snaps if s.val_accuracy is not None]
    best = max(scored, key=lambda s: (s.val_accuracy, s.step)).name if scored else None
    print(f"{'step':>8}  {'val_acc':>7}  {'size':>9}  {'age':>7}  name")
    for s in snaps:
        acc = "-" if s.val_accuracy is None else f"{s.val_accuracy:.4f}"
        marks = [m for m, on in (("latest", pointer and pointer.name == s.name), ("best", s.name == best)) if on]
        print(f"{s.step:>8}  {acc:>7}  {s.size / 2**20:>7.2f}MB  {_age(time.time() - s.created):>7}  {s.name}"
              + (f"  ({', '.join(marks)})" if marks else ""))
    return 0


def cmd_pull(sync, args) -> int:
    """Download, verify and extract a snapshot (newest, or --step) into the run dir, with its cache."""
    from sync.restore import fetch_cache, move_into_place, restore_latest
    if args.step is None:
        step = restore_latest(sync.backend, sync.run_dir, sync.cache_dir, sync.run_dir / STATE_DIR / "download",
                              on_bad_cache=sync._uploader.reupload)
        if step is None:
            raise NoSnapshots(f"no snapshots in {sync.backend.description}: nothing to pull (check "
                              f"sync.folder: the same value the training run used).")
    else:
        match = [s for s in restore_candidates(sync.backend) if s.step == args.step]
        if not match:
            raise SyncError(f"no snapshot of step {args.step} in {sync.backend.description}; see `list`.")
        folder, manifest = _fetch_first_good(sync, match)
        move_into_place(folder, manifest, sync.run_dir)
        sync._uploader.reupload(fetch_cache(sync.backend, manifest, sync.cache_dir)[1])
        step = args.step
    print(f"sync: restored snapshot step {step} into {sync.run_dir}")
    return 0


def _fetch_first_good(sync, copies):
    """Fetch the first of these copies of one snapshot that verifies (a junk copy under its name is skipped)."""
    from sync.restore import fetch_snapshot, unusable
    for i, snap in enumerate(copies):
        try:
            return fetch_snapshot(sync.backend, snap, sync.run_dir / STATE_DIR / "download")
        except SyncError as e:
            if not unusable(e) or i == len(copies) - 1:
                raise
            print(f"sync: a copy of {snap.name} is unusable ({str(e)}); trying the next")


def cmd_push(sync, args) -> int:
    """Send what is queued now; with nothing queued, snapshot the last checkpoint handed to sync."""
    if not sync.staging.pending():
        hand_over = sync.last_hand_over()
        if hand_over is None:
            print(f"sync: nothing to push: no checkpoint was handed to sync in {sync.run_dir} yet")
            return 0
        missing = [f for f in hand_over.files if not (sync.run_dir / f).is_file()]
        # what the remote lacks: a snapshot of that step (final, if the hand-over was) with these very files
        content = None if missing else local_content(sync.run_dir, hand_over.files)
        if snapshot_on_remote(sync.backend, hand_over.step, hand_over.final, content):
            print(f"sync: step {hand_over.step} is already in {sync.backend.description}")
            return 0
        if missing:
            raise SyncError(f"the last checkpoint handed over (step {hand_over.step}) is gone from "
                            f"{sync.run_dir} ({missing[0]} is missing); train again to hand over a new one.")
        sync.on_checkpoint(hand_over)
    outcome = sync.close()
    if not outcome.on_remote:
        raise NotSent(outcome.message)
    print(outcome.message)
    return EXIT_OK


def cmd_prune(sync, args) -> int:
    """Delete remote snapshots beyond sync.keep (the best by val accuracy is kept)."""
    victims = prune(sync.backend, sync.config.keep)
    print(f"sync: deleted {len(victims)} snapshot(s)" + "".join(f"\n  {v.name}" for v in victims))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one command; its exit status comes from the one table."""
    parser = argparse.ArgumentParser(prog="python -m sync", description="See, fetch, send or prune snapshots.")
    parser.add_argument("--config", required=True, help="the run's TOML config (its [run] and [sync] tables)")
    parser.add_argument("--set", action="append", default=[], metavar="sync.KEY=VALUE", help="override a setting")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show snapshots: step, val accuracy, size, age")
    pull = sub.add_parser("pull", help="download and extract a snapshot into the run dir")
    pull.add_argument("--step", type=int, help="which snapshot (default: the newest that verifies)")
    sub.add_parser("push", help="upload queued snapshots now (or the newest local checkpoint)")
    sub.add_parser("prune", help="delete old snapshots beyond sync.keep")
    args = parser.parse_args(argv)
    configure_logging(args.debug)

    def command() -> int:
        config, run_dir, cache_dir = load_toml(args.config, args.set)
        if not config.enabled:
            raise SyncError("sync is off: set sync.folder (a directory) or sync.backend=drive with sync.folder.")
        # only push sends: the other commands never start the background uploader
        sync = open_sync(config, run_dir, cache_dir, run_id=run_dir.name, start_uploader=args.command == "push")
        return {"list": cmd_list, "pull": cmd_pull, "push": cmd_push, "prune": cmd_prune}[args.command](sync, args)
    return run_command(command, args.debug)


if __name__ == "__main__":
    exit_with(main())
