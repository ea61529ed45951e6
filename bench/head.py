"""Head training on the cache: time per epoch and memory for a 1,000-class head on 100k cached vectors,
the cost of the default head search next to one fixed head, side by side in one run; the cost of
safety (training with the default checkpoint cadence vs checkpoints off) and the resume latency
(process start to the first training step of a resumed run with 100,000 cached vectors).

    python bench/head.py [--vectors 100000] [--classes 1000] [--dim 1280] [--batch-size 100]
                         [--search-epochs 10] [--no-search] [--safety-steps 2000] [--safety-repeats 3]
                         [--resume-files 100000]

The vectors are synthetic (class means plus noise), written as float16 shards through the real
BottleneckCache and read back memory-mapped, exactly as training reads them.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from runner.features.cache import BottleneckCache  # noqa: E402
from runner.run.config import Config  # noqa: E402
from runner.training.head import build_head, build_optimizer, feature_statistics  # noqa: E402
from runner.training.search import (RUNG_GROWTH, RUNG_KEEP, StackedHeads, build_search, candidate_grid,  # noqa: E402
                           head_budget)
from runner.training.stages import make_head_step  # noqa: E402
from runner.training.loop import BatchOrder  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_synthetic_cache(root: Path, identity: dict, keys: list[str], labels: np.ndarray, classes: int,
                          dim: int) -> float:
    """Vectors (class means plus noise) for `keys` written as cache shards; returns the seconds it took."""
    rng = np.random.default_rng(0)
    means = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    cache = BottleneckCache(root, identity, dim)
    start = time.perf_counter()
    for lo in range(0, len(keys), 4096):
        hi = min(lo + 4096, len(keys))
        cache.add_shard(keys[lo:hi], means[labels[lo:hi]] + rng.normal(0, 2, (hi - lo, dim)).astype(np.float32))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--search-epochs", type=float, default=3.0,
                        help="budget (train.epochs) of the search-vs-fixed comparison, the same for both")
    parser.add_argument("--no-search", action="store_true", help="skip the search-vs-fixed comparison")
    parser.add_argument("--safety-steps", type=int, default=2000,
                        help="steps per run of the cost-of-safety section (0 = skip it)")
    parser.add_argument("--safety-repeats", type=int, default=3,
                        help="pairs of runs (checkpoints off, on) in the cost-of-safety section")
    parser.add_argument("--resume-files", type=int, default=100_000,
                        help="images (and cached vectors) of the resume-latency section (0 = skip it)")
    parser.add_argument("--scale-steps", type=int, default=30, help="steps timed per k in the --rows mode")
    parser.add_argument("--rows", type=int, default=0,
                        help="instead of the sections above: the head search at this many cached vectors (e.g. "
                             "1000000 with --dim 1280): RSS, s/epoch, the default search's budget and wall time")
    args = parser.parse_args()
    if args.rows:
        print_at_scale(search_at_scale(args), args)
        return
    labels = np.random.default_rng(0).integers(0, args.classes, args.vectors).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        keys = [f"{i:064x}" for i in range(args.vectors)]
        write_seconds = write_synthetic_cache(Path(tmp), {"bench": True}, keys, labels, args.classes, args.dim)
        cache = BottleneckCache(Path(tmp), {"bench": True}, args.dim)  # reopen: memory-mapped reads only
        rss_after_open = current_rss_mib()
        table = cache.table(keys)
        config = Config()
        config.train.batch_size = args.batch_size
        strategy = tf.distribute.get_strategy()
        head = build_head(args.classes, args.dim, config.head, 0)
        optimizer = build_optimizer(config.train, head.trainable_variables)
        step_fn = make_head_step(head, optimizer, strategy, config, args.classes)
        order = BatchOrder(len(table), args.batch_size, 0)
        weights = np.ones(args.batch_size, np.float32)
        steps_per_epoch = args.vectors // args.batch_size
        times = []
        for epoch in range(args.epochs):
            start = time.perf_counter()
            gather = 0.0
            for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
                t0 = time.perf_counter()
                rows = order.indices(step)
                features = table.gather(rows)
                gather += time.perf_counter() - t0
                loss, _ = step_fn(tf.constant(features), tf.constant(labels[rows]), tf.constant(weights),
                                  tf.constant([0, step], tf.int64))
            float(loss)
            times.append((time.perf_counter() - start, gather))
        rss_end = current_rss_mib()
        comparison = None if args.no_search else compare_search(cache, keys, labels, args)
        size_mib = sum(p.stat().st_size for p in Path(tmp).rglob("*.npy")) / 2 ** 20
        safety = cost_of_safety(table, labels, args, Path(tmp) / "safety") if args.safety_steps else None
    print(f"\n{args.classes}-class head on {args.vectors} cached {args.dim}-d float16 vectors "
          f"({size_mib:.0f} MiB on disk, written in {write_seconds:.1f} s), batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs")
    for i, (total, gather) in enumerate(times):
        note = " (includes tracing)" if i == 0 else ""
        print(f"  epoch {i + 1}: {total:6.1f} s ({steps_per_epoch} steps, {steps_per_epoch / total:.0f} steps/s; "
              f"gathering from the memory-mapped cache {gather:.1f} s){note}")
    print(f"  RSS after opening the cache {rss_after_open:.0f} MiB; after training {rss_end:.0f} MiB; "
          f"peak (incl. writing the shards) {peak_rss_mib():.0f} MiB "
          f"(the vectors alone would be {args.vectors * args.dim * 4 / 2 ** 20:.0f} MiB as float32)")
    if comparison:
        fixed, search, steps, epoch_steps, budget, log, per_step, projection = comparison
        print(f"\nhead search vs one fixed head, same budget (train.epochs = {args.search_epochs:g}: {budget} steps, "
              f"90/10 train/validation split of the vectors above, validation once per epoch):")
        print(f"  one fixed head (head.search = off):   {fixed:7.1f} s for {budget} steps")
        print(f"  default search ({len(candidate_grid(1))} candidates):   {search:7.1f} s for {steps} steps "
              f"({epoch_steps / max(steps, 1):.1f} candidates trained per step on average) = "
              f"{search / fixed:.2f}x the fixed head")
        print(f"  {log}")
        print("  time per step with k candidates training (successive halving shrinks k): " + ", ".join(
            f"k={k}: {t * 1000:.1f} ms" for k, t in per_step.items()) + f"; one fixed head {per_step[0] * 1000:.1f} ms")
        (default_steps, ratio) = projection
        print(f"  at the default budget (train.epochs = 100: {default_steps} steps) the search's schedule, with no "
              f"candidate stopping early, would cost {ratio:.2f}x one fixed head trained for the same budget "
              f"(from the per-step times above; early stopping only lowers it)")
    if safety:
        print_cost_of_safety(safety, args)
    if args.resume_files:
        print_resume_latency(resume_latency(args.resume_files))


def compare_search(cache: BottleneckCache, keys: list[str], labels: np.ndarray, args) -> tuple:
    """Wall time of one fixed head and of the default search on the same vectors, budget and evaluations."""
    cut = len(keys) * 9 // 10
    train_table, val_table = cache.table(keys[:cut]), cache.table(keys[cut:])
    train_labels, val_labels = labels[:cut], labels[cut:]
    config = Config()
    config.train.batch_size, config.train.epochs = args.batch_size, args.search_epochs
    budget = head_budget(config.train, cut)
    order = BatchOrder(cut, args.batch_size, 0)
    weights = tf.ones(args.batch_size)
    mean, std = feature_statistics(train_table)

    fixed_head = build_head(args.classes, args.dim, config.head, 0)
    fixed_head.set_standardization(mean, std)
    optimizer = build_optimizer(config.train, fixed_head.trainable_variables)
    step_fn = make_head_step(fixed_head, optimizer, tf.distribute.get_strategy(), config, args.classes)
    val_all = val_table.all()
    start = time.perf_counter()
    for step in range(budget.steps):
        rows = order.indices(step)
        loss, _ = step_fn(tf.constant(train_table.gather(rows)), tf.constant(train_labels[rows]), weights,
                          tf.constant([0, step], tf.int64))
        if (step + 1) % budget.eval_every == 0:
            fixed_head(tf.constant(val_all)).numpy()
    float(loss)
    fixed = time.perf_counter() - start

    head = build_head(args.classes, args.dim, config.head, 0)
    head.set_standardization(mean, std)
    search = build_search(candidate_grid(cut), head, config, budget, args.classes)
    val_features = search.standardize(val_all)
    start, step, candidate_steps = time.perf_counter(), 0, 0
    while step < budget.steps and not search.done():
        rows = order.indices(step)
        candidate_steps += len(search.record.active())
        search.train_step(tf.constant(search.standardize(train_table.gather(rows))),
                          tf.constant(train_labels[rows]), weights, tf.constant([0, step], tf.int64))
        step += 1
        if step % budget.eval_every == 0:
            search.evaluate(step, val_features, val_labels)
    search.write_selected(head, val_features, val_labels)
    elapsed = time.perf_counter() - start
    summary = search.summary()
    selected = summary.selected_candidate
    log = (f"selected: learning rate {selected.learning_rate:g}, weight decay {selected.weight_decay:.3g}, "
           f"best step {selected.best_step}, validation accuracy {selected.best_val_accuracy:.4f}; "
           f"averaged with {len(summary.averaged) - 1} more")
    per_step = step_times(search, step_fn, train_table, train_labels, order, weights)
    config.train.epochs = 100
    default = head_budget(config.train, cut)
    projected = sum(n * per_step[k] for k, n in schedule(len(search.candidates), search.policy.first_rung_step,
                                                         default.steps)) / (default.steps * per_step[0])
    return fixed, elapsed, step, candidate_steps, budget.steps, log, per_step, (default.steps, projected)


def schedule(candidates: int, first_rung: int, steps: int) -> list[tuple[int, int]]:
    """(candidates training, steps) phases of successive halving over a budget, nobody stopping early."""
    phases, k, start, rung = [], candidates, 0, 0
    while start < steps:
        end = min(steps, first_rung * RUNG_GROWTH ** rung)
        phases.append((k, end - start))
        start, rung, k = end, rung + 1, max(1, math.ceil(k * RUNG_KEEP))
    return phases


def step_times(search, fixed_step, table, labels, order, weights, repeats: int = 30) -> dict[int, float]:
    """Seconds per training step with k candidates training (k = 20, 7, 3, 1), and of one fixed head (key 0)."""
    times, batches = {}, [order.indices(i) for i in range(repeats + 2)]
    dim, classes = table.dim, search.num_classes
    for k in sorted({n for n, _ in schedule(len(search.candidates), 1, 10 ** 9)}):
        heads = StackedHeads(search.candidates[:k], dim, classes, 0, 0.0, 0, 0.9, 0.0, 1e-7)
        times[k] = timed(lambda i, rows: heads.train_step(
            tf.constant(search.standardize(table.gather(rows))), tf.constant(labels[rows]), weights,
            tf.constant([0, i], tf.int64), classes, 0.0)[0].numpy(), batches)
    times[0] = timed(lambda i, rows: fixed_step(tf.constant(table.gather(rows)), tf.constant(labels[rows]),
                                                weights, tf.constant([0, i], tf.int64))[0].numpy(), batches)
    return times


def timed(step, batches: list) -> float:
    """Mean seconds of step(i, rows) over the batches, the first two (tracing) not counted."""
    for i, rows in enumerate(batches):
        if i == 2:
            start = time.perf_counter()
        step(i, rows)
    return (time.perf_counter() - start) / (len(batches) - 2)


# -- the head search at a million vectors ----------------------------------------------------------------
def search_at_scale(args) -> dict:
    """The default head search (HeadSearchStage, default settings) on args.rows generated float16 vectors read
    memory-mapped through the real cache (90 % train, 10 % validation): what each part costs in time and RSS,
    the budget, measured steps and validations, and the budget's wall time projected from them."""
    from runner.run.rundir import RunDir
    from runner.training.stages import HeadSearchStage, Split
    rows, classes, dim = args.rows, args.classes, args.dim
    labels = np.random.default_rng(0).integers(0, classes, rows).astype(np.int32)
    r: dict = {"rss_start_mib": current_rss_mib()}
    with tempfile.TemporaryDirectory() as tmp:
        keys = [f"{i:064x}" for i in range(rows)]
        r["write_s"] = write_synthetic_cache(Path(tmp) / "cache", {"bench": True}, keys, labels, classes, dim)
        r["memmap_mib"] = rows * dim * 2 / 2 ** 20
        r["rss_after_write_mib"] = current_rss_mib()
        start = time.perf_counter()
        cache = BottleneckCache(Path(tmp) / "cache", {"bench": True}, dim)  # reopened: shards verified, mapped
        r["open_s"], r["rss_after_open_mib"] = time.perf_counter() - start, current_rss_mib()
        cut = rows * 9 // 10
        start = time.perf_counter()
        train = Split([], labels[:cut], cache.table(keys[:cut]))
        val = Split([], labels[cut:], cache.table(keys[cut:]))
        r["tables_s"], r["rss_after_tables_mib"] = time.perf_counter() - start, current_rss_mib()
        config = Config()
        config.train.batch_size = args.batch_size
        head = build_head(classes, dim, config.head, 0)
        start = time.perf_counter()
        stage = HeadSearchStage(config, head, train, val, np.ones(classes, np.float32), {},
                                RunDir(Path(tmp) / "run").stage("head"))
        r["stage_s"], r["rss_after_stage_mib"] = time.perf_counter() - start, current_rss_mib()
        r["steps"], r["eval_every"] = stage.total_steps, stage.eval_every
        seed, weights = tf.constant([0, 0], tf.int64), tf.ones(args.batch_size)
        step_s = []
        for step in range(args.scale_steps + 2):
            t0 = time.perf_counter()
            inputs, batch_labels = stage.next_batch(step)
            stage.train_step(tf.constant(inputs), tf.constant(batch_labels), weights, seed)
            step_s.append(time.perf_counter() - t0)
        r["step_s"] = float(np.mean(step_s[2:]))  # the first two trace and compile
        start = time.perf_counter()
        stage.validate(stage.eval_every)
        r["validate_s"], r["rss_after_validate_mib"] = time.perf_counter() - start, current_rss_mib()
        start = time.perf_counter()
        stage.search.write_selected(head, stage._val_features, val.labels)  # the last checkpoint's soup
        r["soup_s"], r["rss_after_soup_mib"] = time.perf_counter() - start, current_rss_mib()
        fixed_step = make_head_step(head, build_optimizer(config.train, head.trainable_variables),
                                    tf.distribute.get_strategy(), config, classes)
        per_step = step_times(stage.search, fixed_step, train.table, train.labels, BatchOrder(cut, args.batch_size, 0),
                              weights, repeats=args.scale_steps)
        phases = schedule(len(stage.search.candidates), stage.search.policy.first_rung_step, stage.total_steps)
        evaluations = stage.total_steps // stage.eval_every
        r["per_step_s"] = per_step
        r["projected_s"] = sum(n * per_step[k] for k, n in phases) + evaluations * r["validate_s"]
        r["steps_per_epoch"] = math.ceil(cut / args.batch_size)
    r["rss_peak_mib"] = peak_rss_mib()
    return r


def print_at_scale(r: dict, args) -> None:
    rows, cut = args.rows, args.rows * 9 // 10
    print(f"\nthe default head search on {rows:,} cached {args.dim}-d float16 vectors ({r['memmap_mib']:,.0f} MiB "
          f"memory-mapped; {cut:,} train / {rows - cut:,} validation), {args.classes} classes, batch "
          f"{args.batch_size}, {os.cpu_count()} CPUs")
    print(f"  written in {r['write_s']:.0f} s; cache reopened (every shard's hash checked) in {r['open_s']:.1f} s")
    for name in ("start", "after_write", "after_open", "after_tables", "after_stage", "after_validate", "after_soup"):
        print(f"  RSS {name.replace('_', ' '):15s} {r[f'rss_{name}_mib']:8,.0f} MiB")
    print(f"  peak RSS (getrusage maxrss)  {r['rss_peak_mib']:8,.0f} MiB")
    print(f"  split tables {r['tables_s']:.1f} s; HeadSearchStage built (statistics, validation vectors) in "
          f"{r['stage_s']:.1f} s")
    epoch = r["steps_per_epoch"]
    per_step = r["per_step_s"]
    print(f"  step with 20 candidates {1000 * r['step_s']:.1f} ms through the stage (gather + standardize + step) "
          f"= {epoch * r['step_s']:,.0f} s/epoch ({epoch:,} steps); one fixed head {1000 * per_step[0]:.1f} ms = "
          f"{epoch * per_step[0]:,.0f} s/epoch")
    print("  per step with k candidates: " + ", ".join(f"k={k}: {1000 * t:.1f} ms" for k, t in per_step.items() if k))
    print(f"  one validation of every candidate on {rows - cut:,} vectors {r['validate_s']:.1f} s; the final soup "
          f"{r['soup_s']:.1f} s")
    print(f"  default budget (train.epochs = {Config().train.epochs:g}): {r['steps']:,} steps, validation every "
          f"{r['eval_every']:,}; projected wall time with no candidate stopping early "
          f"{r['projected_s'] / 3600:,.1f} h (successive halving from the per-step times above)")


# -- cost of safety: checkpoint cadence overhead and resume latency -----------------------------------
def train_through_the_loop(table, labels: np.ndarray, args, run_dir: Path, checkpoints: bool) -> tuple[float, float]:
    """(seconds in all, seconds inside checkpoint saves) to train args.safety_steps steps of the configured head
    (head.search = off) through the runner's own stage and step loop (validation every eval.every_steps on a
    tenth of the vectors), checkpointing on the default cadence, or only at the end."""
    from runner.training.events import CheckpointPolicy, Listeners, MetricsLogger
    from runner.run.rundir import RunDir
    from runner.training.stages import FixedHeadStage, Split
    from runner.training.loop import StageLoop, StopFlag
    config = Config()
    config.run.dir, config.train.batch_size, config.train.progress = str(run_dir), args.batch_size, "lines"
    config.head.search, config.train.steps = "off", args.safety_steps
    strategy = tf.distribute.get_strategy()
    val_rows = np.arange(0, len(table), 10)
    train_split = Split([], labels, table)
    val_split = Split([], labels[val_rows], FeatureRows(table, val_rows))
    head = build_head(args.classes, args.dim, config.head, 0)
    run = RunDir(run_dir)
    weights = np.ones(args.classes, np.float32)
    stage = FixedHeadStage(config, strategy, head, train_split, val_split, weights, {}, run.stage("head"))
    cadence = config.checkpoint if checkpoints else type(config.checkpoint)(every_steps=0, every_seconds=0)
    policy = CheckpointPolicy(cadence.every_steps, cadence.every_seconds)
    start = time.perf_counter()
    StageLoop(stage, Listeners([MetricsLogger(run.metrics)]), strategy, weights, StopFlag(), policy).run()
    return time.perf_counter() - start, stage.store.seconds_saving


class FeatureRows:
    """Some rows of a FeatureTable, as a table (gather / all) of their own."""

    def __init__(self, table, rows: np.ndarray):
        self.table, self.rows, self.dim = table, rows, table.dim

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        return self.table.gather(self.rows[indices])

    def all(self) -> np.ndarray:
        return self.table.gather(self.rows)


def cost_of_safety(table, labels: np.ndarray, args, root: Path) -> dict:
    """Training time with the default checkpoint cadence vs checkpoints off, in args.safety_repeats pairs of
    adjacent runs (the order alternating, so a slow spell of the shared machine hits both modes), and the
    time spent inside the saves themselves (the direct cost, less sensitive to a shared machine)."""
    pairs, saving = [], []
    for attempt in range(args.safety_repeats):
        modes = ("off", "on") if attempt % 2 == 0 else ("on", "off")
        pair = {}
        for mode in modes:
            total, saves = train_through_the_loop(table, labels, args, root / f"{mode}-{attempt}", mode == "on")
            pair[mode] = total
            if mode == "on":
                saving.append((saves, total))
        pairs.append(pair)
    c = Config().checkpoint
    saves = args.safety_steps // c.every_steps if c.every_steps else 1
    return {"pairs": pairs, "saving": min(saving), "saves": saves}


def print_cost_of_safety(safety: dict, args) -> None:
    c = Config().checkpoint
    pairs = safety["pairs"]
    ratios = sorted(pair["on"] / pair["off"] for pair in pairs)
    print(f"\ncost of safety: {args.safety_steps} steps through the step loop (validation every "
          f"{Config().eval.every_steps} steps), {len(pairs)} pairs of adjacent runs")
    def runs(mode: str) -> str:
        return ", ".join(f"{pair[mode]:.2f}" for pair in pairs)
    print(f"  checkpoints off                          runs: {runs('off')} s")
    print(f"  checkpoints every {c.every_steps} steps / {c.every_seconds:.0f} s (default) runs: {runs('on')} s")
    print(f"  overhead, median of the pairs {100 * (float(np.median(ratios)) - 1):+.1f} %  (pairs: "
          f"{', '.join(f'{100 * (r - 1):+.1f}' for r in ratios)} %; target <= 2 %)")
    inside, total = safety["saving"]
    print(f"  inside the {safety['saves']} saves: {inside:.2f} s of {total:.2f} s = {100 * inside / (total - inside):.1f} % "
          f"on top of training without them ({1000 * inside / safety['saves']:.0f} ms per checkpoint)")


def resume_latency(files: int, classes: int = 1000) -> dict:
    """Seconds from process start to the first training step of a resumed run (resume.py in a child)
    whose data.dir holds `files` images, all of them cached; and the phases seen on its output."""
    import signal
    import subprocess
    import threading
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scan import write_tree
    from runner.features.backbones import build_backbone
    from runner.run.config import BackboneConfig
    from runner.data.scan import HashIndex, scan_dataset
    weights = REPO.parent / "shared" / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
    backbone = build_backbone(BackboneConfig(name="mobilenet", weights=str(weights), alpha=0.25))
    with tempfile.TemporaryDirectory() as tmp:
        data, run_dir, cache_dir = Path(tmp) / "data", Path(tmp) / "run", Path(tmp) / "cache"
        write_tree(data, classes, files // classes)
        dataset = scan_dataset(data, 10, 10, HashIndex(cache_dir / "file-hashes.json"), 1, "lines")
        write_synthetic_cache(cache_dir, backbone.cache_identity, [r.sha256 for r in dataset.images],
                              np.array([r.label for r in dataset.images]), classes, backbone.feature_dim)
        command = [sys.executable, str(REPO / "resume.py"), "--config", str(REPO / "configs" / "clothing_local.toml")]
        for setting in (f"data.dir={data}", f"run.dir={run_dir}", f"cache.dir={cache_dir}", f"backbone.weights={weights}",
                        "train.steps=1000000", "head.search=off", "checkpoint.every_steps=100", "export.enabled=false",
                        "train.progress=lines"):
            command += ["--set", setting]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")

        def start(extra: list[str]):
            process = subprocess.Popen(command + extra, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
            lines: list[tuple[float, str]] = []
            threading.Thread(target=lambda: lines.extend((time.perf_counter(), line) for line in process.stdout),
                             daemon=True).start()
            return process, lines

        def wait_for(lines, text: str, process, timeout: float = 600) -> float:
            deadline = time.perf_counter() + timeout
            while time.perf_counter() < deadline and process.poll() is None:
                for at, line in list(lines):
                    if text in line:
                        return at
                time.sleep(0.01)
            raise SystemExit(f"resume.py never printed {text!r}:\n" + "".join(line for _, line in lines))

        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tensorflow, keras"], env=env, check=True)
        import_seconds = time.perf_counter() - began
        first, lines = start([])
        wait_for(lines, "checkpoint saved", first)
        first.send_signal(signal.SIGTERM)
        first.wait(120)
        began = time.perf_counter()
        resumed, lines = start(["--set", "eval.every_steps=1"])
        at_resumed = wait_for(lines, "resumed from step", resumed)
        step = int(next(line for _, line in lines if "resumed from step" in line).split("step ")[1].split(",")[0])
        metrics = run_dir / "metrics.jsonl"
        while resumed.poll() is None:
            if metrics.exists() and f'"step": {step + 1},' in metrics.read_text():
                at_first_step = time.perf_counter()
                break
            time.sleep(0.01)
        else:
            raise SystemExit("the resumed run ended before its first step:\n" + "".join(line for _, line in lines))
        resumed.send_signal(signal.SIGTERM)
        resumed.wait(120)
        scanned = next((at for at, line in lines if f"checking images: {len(dataset.images)}/" in line), None)
    return {"files": len(dataset.images), "step": step, "import": import_seconds,
            "scan_done": None if scanned is None else scanned - began,
            "restored": at_resumed - began, "first_step": at_first_step - began}


def print_resume_latency(latency: dict) -> None:
    print(f"\nresume latency: resume.py restarted on a run whose data.dir has {latency['files']} images, all "
          f"cached ({latency['files']} vectors), resuming at step {latency['step']}")
    print(f"  (a bare `python -c 'import tensorflow, keras'` takes {latency['import']:.2f} s here)")
    if latency["scan_done"] is not None:
        print(f"  scan done (stat cache)              {latency['scan_done']:6.2f} s after process start")
    print(f"  checkpoint restored                 {latency['restored']:6.2f} s")
    print(f"  first training step                 {latency['first_step']:6.2f} s")


if __name__ == "__main__":
    main()
