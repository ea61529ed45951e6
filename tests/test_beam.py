"""runner.features.beam on DirectRunner (2 worker processes) over a subset of the shared photos and one file only the
decoder can tell is not an image: a worker killed mid-bundle fails the first pipeline without leaving a shard
the trainer would read, the re-run completes the cache, its vectors equal local extraction's, the undecodable
file is recorded as the trainer records it, and the trainer's preparation then computes none."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil

import numpy as np
import pytest

pytest.importorskip("apache_beam")  # a guard only: CI installs requirements-beam.txt

from runner.features.beam import extract_with_beam, parse_args  # noqa: E402
from runner.run.config import load_config  # noqa: E402
from tests.beam_faults import DieOnceMidShard  # noqa: E402
from tests.helpers import REPO  # noqa: E402

slow = pytest.mark.slow  # the pipeline starts worker processes
DIRECT = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
CLASSES, PER_CLASS, SHARD_SIZE = 2, 10, 4  # 20 images in 5 shards
GARBAGE = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9"  # passes the scan, fails the decoder


@pytest.fixture(scope="module")
def photos(shared_assets, tmp_path_factory):
    """A few images of the first classes of clothing-small."""
    clothing, _ = shared_assets
    root = tmp_path_factory.mktemp("beam-photos")
    for folder in sorted(p for p in clothing.iterdir() if p.is_dir())[:CLASSES]:
        (root / folder.name).mkdir()
        for image in sorted(folder.iterdir())[:PER_CLASS]:
            shutil.copy2(image, root / folder.name / image.name)
    (root / folder.name / "garbage.jpg").write_bytes(GARBAGE)
    return root


def config_for(run_dir, photos, shared_assets):
    _, weights = shared_assets
    return load_config(REPO / "configs" / "clothing_local.toml",
                       [f"data.dir={photos}", f"run.dir={run_dir}", f"backbone.weights={weights}",
                        f"cache.shard_size={SHARD_SIZE}", "train.progress=lines", "data.min_images_per_class=2"])


@pytest.fixture(scope="module")
def beam_run(photos, shared_assets, tmp_path_factory, monkeypatch_module):
    """A pipeline whose worker dies mid-shard, then the same pipeline again: (config, cache after the kill)."""
    monkeypatch_module.setenv("PYTHONPATH", str(REPO))  # the worker processes import runner and tests
    config = config_for(tmp_path_factory.mktemp("beam-run") / "run", photos, shared_assets)
    with pytest.raises(Exception):
        extract_with_beam(config, DIRECT, extract_class=DieOnceMidShard)
    after_kill = cache_contents(config)
    computed = extract_with_beam(config, DIRECT)
    return config, after_kill, computed


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as m:
        yield m


def cache_contents(config):
    """The trainer's view of the cache: {content hash: vector}, and the shards it set aside as corrupt."""
    from runner.features.backbones import build_backbone
    from runner.features.cache import BottleneckCache
    backbone = build_backbone(config.backbone)
    cache = BottleneckCache(config.cache_dir, backbone.cache_identity, backbone.feature_dim, config.cache.dtype)
    keys = sorted(k.decode() for k in cache.index)
    vectors = cache.table(keys).all() if keys else np.zeros((0, backbone.feature_dim))
    return dict(zip(keys, vectors)), sorted(p.name for p in cache.dir.glob("*.corrupt"))


def local_vectors(config, tmp_path):
    """The same images extracted by the trainer's own extraction, into a fresh cache."""
    import tensorflow as tf
    from runner.features.backbones import build_backbone
    from runner.features.cache import BottleneckCache
    from runner.data.scan import HashIndex, scan_dataset
    from runner.features.extract import extract_missing
    dataset = scan_dataset(config.data.dir, 10, 10, HashIndex(tmp_path / "hashes.json"), 2, "lines")
    backbone = build_backbone(config.backbone)
    cache = BottleneckCache(tmp_path / "cache", backbone.cache_identity, backbone.feature_dim, "float16")
    extract_missing(dataset.images, backbone, cache, tf.distribute.get_strategy(), config.cache.batch_size,
                    config.cache.shard_size, "lines")
    keys = sorted(k.decode() for k in cache.index)
    return dict(zip(keys, cache.table(keys).all())), cache.undecodable


@slow
def test_a_worker_killed_mid_shard_leaves_only_complete_shards_and_the_rerun_completes_the_cache(beam_run):
    config, (after_kill, corrupt_after_kill), computed = beam_run
    assert corrupt_after_kill == [], "no shard the trainer reads may be partial"
    assert len(after_kill) < CLASSES * PER_CLASS, "the kill must have cost the pipeline its work"
    final, corrupt = cache_contents(config)
    assert corrupt == [] and len(final) == CLASSES * PER_CLASS
    assert computed == CLASSES * PER_CLASS - len(after_kill)
    assert all(np.array_equal(final[k], v) for k, v in after_kill.items())
    assert not (config.cache_dir / "beam-plans").exists()


@slow
def test_beam_vectors_equal_local_extraction_within_float16_rounding(beam_run, tmp_path):
    config, _, _ = beam_run
    final, _ = cache_contents(config)
    local, local_undecodable = local_vectors(config, tmp_path)
    assert sorted(final) == sorted(local)
    beam_undecodable = json.loads((config.cache_dir / "undecodable.json").read_text())
    assert beam_undecodable == local_undecodable == {hashlib.sha256(GARBAGE).hexdigest(): local_undecodable[
        hashlib.sha256(GARBAGE).hexdigest()]}
    for key in local:
        np.testing.assert_allclose(final[key], local[key], rtol=2 ** -9, atol=1e-4)


@slow
def test_the_trainer_then_computes_no_vector_and_a_second_pipeline_none(beam_run, caplog):
    import tensorflow as tf
    from runner.prepare import prepare
    from runner.run.rundir import RunDir
    from runner.training.loop import StopFlag
    config, _, _ = beam_run

    class NoSync:
        enabled = False
    with caplog.at_level(logging.INFO, logger="runner"):
        prepared = prepare(config, RunDir(config.run_dir), NoSync(), StopFlag(), tf.distribute.get_strategy())
    assert prepared.computed == 0 and len(prepared.cache) == CLASSES * PER_CLASS
    assert [item["path"].endswith("garbage.jpg") for item in prepared.dataset.skipped] == [True]
    assert "0 vectors computed now" in caplog.text
    assert extract_with_beam(config, DIRECT) == 0


def test_the_command_line_passes_every_other_argument_to_beam():
    args, beam_args = parse_args(["--config", "c.toml", "--set", "a.b=1", "--runner", "DataflowRunner",
                                  "--images-from", "gs://b/p", "--direct_num_workers=2"])
    assert (args.config, args.set, args.images_from) == ("c.toml", ["a.b=1"], "gs://b/p")
    assert beam_args == ["--runner", "DataflowRunner", "--direct_num_workers=2"]
