"""Chaos-suite fixtures: one small generated dataset and one finished run (with export and sync) per session."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import MOBILENET_WEIGHTS, REPO, run_resume, write_synthetic_dataset

SMALL_SETTINGS = ("train.steps=40", "eval.every_steps=10", "checkpoint.every_steps=10", "train.batch_size=16",
                  "checkpoint.every_seconds=0", "data.min_images_per_class=1", "cache.shard_size=8",
                  "cache.batch_size=8")


def small_args(run_dir: Path, cache_dir: Path | None, data_dir: Path, *extra: str, export: bool = False) -> list[str]:
    """resume.py arguments for a few-second run on a small dataset with the real MobileNet weights."""
    args = ["--config", str(REPO / "configs" / "clothing_local.toml"), "--set", f"run.dir={run_dir}",
            "--set", f"data.dir={data_dir}", "--set", f"backbone.weights={MOBILENET_WEIGHTS}",
            "--set", "train.progress=lines", "--set", f"export.enabled={str(export).lower()}",
            "--set", "export.formats=saved_model,labels"]
    if cache_dir is not None:
        args += ["--set", f"cache.dir={cache_dir}"]
    for item in SMALL_SETTINGS + extra:
        args += ["--set", item]
    return args


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, shared_assets) -> Path:
    """3 classes x 12 generated JPEGs."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("chaos-data") / "data", 3, 12)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, small_data):
    """One unbroken small run with export, synced to a folder: (run_dir, cache_dir, sync_folder, output)."""
    root = tmp_path_factory.mktemp("chaos-run")
    run_dir, cache_dir, folder = root / "run", root / "cache", root / "sync"
    result = run_resume(*small_args(run_dir, cache_dir, small_data, f"sync.folder={folder}", export=True))
    assert result.returncode == 0, result.stdout
    return run_dir, cache_dir, folder, result.stdout


def copy_cache(cache_dir: Path, dest: Path) -> Path:
    """A private copy of a cache folder, so a test may damage it."""
    shutil.copytree(cache_dir, dest)
    return dest


@pytest.fixture(scope="session")
def linked_clothing(tmp_path_factory, shared_assets) -> Path:
    """The 1,885 real photos as symlinks in a private folder (big enough for a phase to be caught mid-way)."""
    from tests.helpers import CLOTHING
    root = tmp_path_factory.mktemp("linked") / "clothing"
    for photo in CLOTHING.rglob("*"):
        if photo.is_file():
            target = root / photo.relative_to(CLOTHING)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(photo)
    return root


from tests.sync.conftest import drive_config, fake_drive, user_credentials  # noqa: E402,F401  (the HTTPS fake Drive)
