"""A many-class run end to end, timed by phase: first run, resume latency, restore on a fresh disk.

    python bench/scale.py [--classes 1000] [--images 25000] [--steps 500] [--json]

Generates `--images` small JPEGs in `--classes` class folders (a temp dir), then runs `resume.py` three
times with folder sync, as a user would, and reads the phases off its log (seconds since process start):
  first run   scan, extraction, head training (`--steps` steps: the default budget of 100 epochs would take
              hours at 1,000 classes on a CPU and measures the head, not the pipeline), end (evaluation,
              report, export, final snapshot), with the child's peak RSS and the log line it peaked after
  resume      the same command with `train.steps` raised: process start to the first training step
  restore     run dir and cache deleted (a new VM): process start to "restored", and to the first step
With --json the last line is one JSON object of these figures.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"


def _write_class(job: tuple[Path, int, int]) -> None:
    import numpy as np
    from PIL import Image
    folder, label, count = job
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(label)
    base = rng.integers(0, 256, (1, 1, 3))
    for i in range(count):
        noise = rng.integers(-40, 40, (96, 128, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype("uint8")).save(folder / f"{i:03d}.jpg", quality=85)


def write_dataset(root: Path, classes: int, images: int) -> None:
    """`images` 128 x 96 JPEGs spread evenly over `classes` folders (a colour per class, noise per image)."""
    per_class = [images // classes + (c < images % classes) for c in range(classes)]
    with Pool(os.cpu_count()) as pool:
        pool.map(_write_class, [(root / f"class{c:04d}", c, n) for c, n in enumerate(per_class)])


def rss_mib(pid: int) -> float:
    """The resident set of process `pid` now (Linux /proc), 0 once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else 0.0


def timed_run(args: list[str], marks: dict[str, str]) -> tuple[dict[str, float], dict, str]:
    """Run resume.py ARGS; returns (seconds from start to the first line containing each mark, memory, output).
    Memory: the peak RSS in MiB (the kernel's count) and where it peaked (RSS sampled every 50 ms: the log
    line printed last before the highest sample). Exits with the output if the run fails."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "resume.py", *args], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: dict[str, float] = {}
    lines = ["(start-up)"]
    highest = {"mib": 0.0, "after": lines[0], "at_s": 0.0}

    def sample() -> None:
        while process.poll() is None:
            mib = rss_mib(process.pid)
            if mib > highest["mib"]:
                highest.update(mib=mib, after=lines[-1].strip(), at_s=time.perf_counter() - start)
            time.sleep(0.05)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in process.stdout:
        lines.append(line)
        for name, text in marks.items():
            if name not in seen and text in line:
                seen[name] = time.perf_counter() - start
    seen["end"] = time.perf_counter() - start
    _, status, usage = os.wait4(process.pid, 0)
    sampler.join()
    output = "".join(lines[1:])
    if status != 0:
        raise SystemExit(f"resume.py {' '.join(args)} failed:\n{output}")
    memory = {"peak_rss_mib": round(usage.ru_maxrss / 1024), "sampled_peak_mib": round(highest["mib"]),
              "peak_at_s": round(highest["at_s"], 1), "peak_after_line": highest["after"][:160]}
    return seen, memory, output


def between(seen: dict[str, float], first: str, then: str) -> float:
    return round(seen[then] - seen[first], 1)


def measure(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        write_dataset(tmp / "data", args.classes, args.images)
        print(f"wrote {args.images} JPEGs in {args.classes} classes in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
        run_dir, cache, remote = tmp / "run", tmp / "cache", tmp / "sync"

        def command(steps: int) -> list[str]:
            settings = [f"data.dir={tmp / 'data'}", f"run.dir={run_dir}", f"cache.dir={cache}",
                        f"backbone.weights={WEIGHTS}", f"train.steps={steps}", "data.min_images_per_class=2",
                        f"sync.backend=folder", f"sync.folder={remote}"]
            return ["--config", str(REPO / "configs" / "clothing_local.toml"),
                    *[part for s in settings for part in ("--set", s)]]

        first, memory, _ = timed_run(command(args.steps), {
            "scan": "checking ", "extract": "extracting bottlenecks for", "train": "training head: 1/",
            "trained": f"training head: {args.steps}/{args.steps}", "done": "done: step"})
        resume, _, _ = timed_run(command(args.steps + 100), {
            "resumed": "resumed from step", "train": "training head: "})
        shutil.rmtree(run_dir)
        shutil.rmtree(cache)
        restore, _, output = timed_run(command(args.steps + 200), {"restored": "restored step",
                                                                   "ready": "vectors computed"})
        downloaded = re.search(r"\((\d+) cache files downloaded", output)
    return {
        "first_run": {"scan": between(first, "scan", "extract"), "extraction": between(first, "extract", "train"),
                      "head_training": between(first, "train", "trained"),
                      "end": between(first, "trained", "end"), "total": round(first["end"], 1),
                      **memory},
        "resume": {"to_first_step": round(resume["train"], 1)},
        "restore": {"to_restored": round(restore["restored"], 1), "to_ready": round(restore["ready"], 1),
                    "cache_files": int(downloaded.group(1)) if downloaded else 0},
        "images": args.images, "classes": args.classes, "steps": args.steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--images", type=int, default=25_000)
    parser.add_argument("--steps", type=int, default=500, help="head steps of the first run")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object, last line")
    args = parser.parse_args()
    results = measure(args)
    first = results["first_run"]
    print(f"\n{args.images} images in {args.classes} classes, MobileNet v1 0.25, {os.cpu_count()} CPUs, folder sync")
    print(f"  first run     {first['total']:6.1f} s: scan {first['scan']} s, extraction {first['extraction']} s, "
          f"{args.steps} head steps {first['head_training']} s, end (evaluate, report, export, snapshot) "
          f"{first['end']} s; peak RSS {first['peak_rss_mib']} MiB")
    print(f"                peak sampled {first['sampled_peak_mib']} MiB at {first['peak_at_s']} s, after the line "
          f"{first['peak_after_line']!r}")
    print(f"  resume        {results['resume']['to_first_step']:6.1f} s from process start to the first training step")
    print(f"  restore       {results['restore']['to_restored']:6.1f} s to restored, "
          f"{results['restore']['to_ready']} s to the data ready to train (fresh disk, "
          f"{results['restore']['cache_files']} cache files downloaded)")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
