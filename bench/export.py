"""The export's share of a default run at a big backbone's size, first run and rerun, and what it writes.

    python bench/export.py [--backbone inception_v3] [--json]

On the shared clothing photos with `configs/clothing_local.toml` and `backbone.weights = none` (random weights:
the export's cost depends on the graph's size, not on the weights' values; ImageNet weights cannot be
downloaded here), in child processes with fresh folders:
  first run      resume.py from scratch: its phases read from its timestamped output lines (bench/e2e.py's
                 parsing); the TFLite backbone is converted in the background while the head trains
  inline export  `python -m runner.export --run RUN --out DIR` after deleting the cached conversion: the
                 export converting the backbone itself, as every export did before the cache existed
  rerun          resume.py with another run.dir and the same cache.dir (a user's next run on the same
                 backbone: more photos, other settings): nothing to extract, the converted backbone reused
Printed: each run's wall time, export seconds and share, and the export's size by format. --json: the last
line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from e2e import CONFIG, SHARED, phase_seconds, run_timed  # noqa: E402


def resume(args, run_dir: Path, cache_dir: Path) -> dict:
    """One resume.py run: wall seconds, phases, export seconds and share."""
    settings = [f"data.dir={args.data}", f"backbone.name={args.backbone}", "backbone.weights=none",
                "backbone.allow_random_weights=true", f"run.dir={run_dir}", f"cache.dir={cache_dir}",
                "train.progress=lines"]
    command = [sys.executable, str(REPO / "resume.py"), "--config", str(CONFIG)]
    command += [part for setting in settings for part in ("--set", setting)]
    wall, lines, code, _ = run_timed(command)
    if code != 0:
        raise SystemExit(f"resume.py failed ({code}):\n" + "\n".join(line for _, line in lines[-30:]))
    phases = phase_seconds(lines, wall)
    return {"s": wall, "phases": phases, "export_s": phases["export"], "export_share": phases["export"] / wall,
            "tflite_lines": [line.split("runner: ")[-1] for _, line in lines if "TFLite:" in line]}


def inline_export(run_dir: Path, cache_dir: Path, out: Path) -> float:
    """Seconds of `python -m runner.export` converting the backbone itself (the cached conversion deleted)."""
    shutil.rmtree(cache_dir / "tflite", ignore_errors=True)
    began = time.perf_counter()
    _, lines, code, _ = run_timed([sys.executable, "-m", "runner.export", "--run", str(run_dir), "--out", str(out)])
    if code != 0:
        raise SystemExit(f"runner.export.exporter failed ({code}):\n" + "\n".join(line for _, line in lines[-30:]))
    return time.perf_counter() - began


def sizes(export: Path) -> dict[str, int]:
    """Bytes of the export by format: saved_model (saved_model.pb + its variables' data), meta_graph
    (variables.meta + checkpoint state), tflite, the rest."""
    meta = {"variables/variables.meta", "variables/checkpoint"}
    out = {"saved_model": 0, "meta_graph": 0, "tflite": 0, "other": 0}
    for path in export.rglob("*"):
        if path.is_file():
            rel = path.relative_to(export).as_posix()
            kind = ("meta_graph" if rel in meta else "tflite" if rel.endswith(".tflite") else
                    "saved_model" if rel == "saved_model.pb" or rel.startswith("variables/") else "other")
            out[kind] += path.stat().st_size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "datasets" / "clothing-small"))
    parser.add_argument("--backbone", default="inception_v3")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object, last line")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        root = Path(tmp)
        first = resume(args, root / "run", root / "cache")
        size = sizes(root / "run" / "export")
        inline_s = inline_export(root / "run", root / "cache", root / "inline")
        rerun = resume(args, root / "run-2", root / "cache")
    print(f"\n{args.backbone} (random weights), clothing-small, default job:")
    for name, run in (("first run", first), ("rerun, same cache", rerun)):
        print(f"  {name:18s} {run['s']:6.1f} s, export {run['export_s']:5.1f} s = {100 * run['export_share']:.1f} % "
              f"of the run  [{'; '.join(run['tflite_lines'])}]")
    print(f"  inline export (the backbone converted by the export itself, as before): {inline_s:.1f} s "
          f"(process start included)")
    print("  export size: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in size.items()))
    if args.json:
        print(json.dumps({"backbone": args.backbone, "first_s": round(first["s"], 1),
                          "first_export_s": round(first["export_s"], 1),
                          "first_export_share": round(first["export_share"], 3),
                          "rerun_s": round(rerun["s"], 1), "rerun_export_s": round(rerun["export_s"], 1),
                          "rerun_export_share": round(rerun["export_share"], 3), "inline_export_s": round(inline_s, 1),
                          "first_phases_s": {k: round(v, 1) for k, v in first["phases"].items()},
                          "export_bytes": size}))


if __name__ == "__main__":
    main()
