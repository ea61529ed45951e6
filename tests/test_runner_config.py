"""Configuration: one typed object from TOML + --set; unknown keys and bad values named with the fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ProjectError
from runner.run.config import load_config, to_toml
from tests.helpers import REPO, run_resume

LOCAL = REPO / "configs" / "clothing_local.toml"


def test_set_overrides_any_key_with_typed_values():
    config = load_config(LOCAL, ["train.steps=8000", "train.learning_rate=0.01", "head.hidden_units=64",
                                 "run.dir=/tmp/x y", "backbone.allow_random_weights=true"])
    assert config.train.steps == 8000 and config.train.learning_rate == 0.01
    assert config.head.hidden_units == 64 and config.run.dir == "/tmp/x y"
    assert config.backbone.allow_random_weights is True
    assert config.backbone.name == "mobilenet" and config.backbone.alpha == 0.25


@pytest.mark.parametrize("override, message", [
    ("train.stpes=10", "unknown setting 'train.stpes'. Keys of [train] are: steps"),
    ("trian.steps=10", "unknown setting 'trian.steps'"),
    ("backbone.name=vgg", "use one of: inception_v3, mobilenet_v2"),
    ("train.steps=-5", "train.steps = -5 is too small"),
    ("train.steps=many", "train.steps = 'many': expected an integer"),
    ("train.learning_rate=nan", "train.learning_rate = nan: it must be a finite number"),
    ("split.validation_percent=inf", "must be a finite number"),
    ("train.strategy=tpu", "use one of: default, mirrored"),
    ("split.test_percent=95", "split.test_percent = 95.0 is too large; it must be at most 90"),
    ("backbone.weights=none", "backbone.allow_random_weights = true"),
    ("checkpoint.every_steps=0", None),
    ("steps", "write it as section.key=value"),
])
def test_bad_settings_are_rejected_naming_the_key(override, message):
    if message is None:  # valid on its own: time-based checkpoints still run
        load_config(LOCAL, [override])
        with pytest.raises(ProjectError, match="both 0"):
            load_config(LOCAL, [override, "checkpoint.every_seconds=0"])
        return
    with pytest.raises(ProjectError) as error:
        load_config(LOCAL, [override])
    assert message in str(error.value)


def test_unknown_key_in_a_toml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\ndir = "x"\n[train]\nlearning_rat = 0.1\n')
    with pytest.raises(ProjectError, match=r"bad.toml: unknown setting 'train.learning_rat'"):
        load_config(bad)


def test_printed_config_loads_back_to_the_same_settings(tmp_path):
    config = load_config(LOCAL, ["train.steps=123", "train.epsilon=1e-7"])
    saved = tmp_path / "saved.toml"
    saved.write_text(to_toml(config))
    assert load_config(saved) == config


def test_cli_help_lists_settings_and_errors_have_no_traceback():
    result = run_resume("--help")
    assert result.returncode == 0
    for key in ("data.dir", "backbone.weights", "checkpoint.every_seconds", "sync.backend"):
        assert key in result.stdout
    result = run_resume("--config", str(LOCAL), "--set", "train.batch_size=0")
    assert result.returncode == 2
    assert "train.batch_size = 0 is too small" in result.stdout and "Traceback" not in result.stdout
    result = run_resume("--config", str(LOCAL), "--print-config", "--set", "train.steps=77")
    assert result.returncode == 0 and "steps = 77" in result.stdout


def test_split_percentages_must_leave_images_to_train_on():
    with pytest.raises(ProjectError, match="must be below 100"):
        load_config(LOCAL, ["split.test_percent=60", "split.validation_percent=40"])


def test_the_settings_page_is_generated_from_the_settings_declarations():
    import dataclasses

    from runner.run.config import Config, settings_page
    page = (REPO / "docs" / "settings.md").read_text()
    assert page == settings_page(), "docs/settings.md is stale: run `python -m runner.run.config > docs/settings.md`"
    config = Config()
    keys = [f"`{s.name}.{f.name}`" for s in dataclasses.fields(config) for f in dataclasses.fields(getattr(config, s.name))]
    assert len(keys) > 60 and all(key in page for key in keys)


def test_a_url_path_setting_is_kept_as_given_while_a_relative_path_becomes_absolute(tmp_path):
    config = load_config(None, ["data.dir=photos", "cache.dir=gs://bucket/cache"])
    assert config.cache.dir == "gs://bucket/cache"
    assert Path(config.data.dir).is_absolute()


def test_fine_tuning_takes_its_optimizer_and_cadence_from_its_own_section_not_the_heads():
    import tensorflow as tf
    from runner.run.config import ignored_settings
    from runner.training.head import build_optimizer
    config = load_config(None, ["data.dir=photos", "fine_tune.enabled=true", "train.rho=0.99", "fine_tune.rho=0.5",
                                "train.decay_rate=0.5", "eval.every_steps=7"])
    optimizer = build_optimizer(config.fine_tune, [tf.Variable([1.0])], learning_rate=1e-4)
    assert optimizer.rho == 0.5 and float(optimizer.learning_rate) == pytest.approx(1e-4)
    warned = " ".join(ignored_settings(config))
    assert "train.decay_rate = 0.5" in warned and "fine_tune.decay_rate" in warned
    assert "eval.every_steps = 7" in warned and "fine_tune.eval_every_steps" in warned


def test_a_config_that_is_a_folder_or_not_utf8_is_exit_2_naming_the_file(tmp_path):
    result = run_resume("--config", str(tmp_path), "--print-config")
    assert result.returncode == 2, result.stdout
    assert f"config file {tmp_path} is a folder" in result.stdout and "Traceback" not in result.stdout
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[data]\ndir = "/data/\xc4pfel"\n'.encode("latin-1"))
    with pytest.raises(ProjectError, match="is not UTF-8 text") as error:
        load_config(latin1)
    assert str(latin1) in str(error.value)
