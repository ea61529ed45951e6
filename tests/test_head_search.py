"""The head search in process, on synthetic vectors: RMSProp as Keras does it, best step kept, divergence,
successive halving, the soup, and an exact resume from a checkpoint taken mid-search."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from runner.run.config import Config
from runner.training.head import build_head, build_optimizer
from runner.training.search import (PRUNED, STOPPED, TRAINING, Candidate, HeadBudget, SearchPolicy, build_search,
                           candidate_grid, head_budget)
from runner.training.loop import BatchOrder


def blobs(num_classes=6, dim=16, per_class=40, noise=2.0, seed=0, separation=1.0):
    """Gaussian class blobs: (train_x, train_y, val_x, val_y)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, separation, (num_classes, dim))
    def draw(n):
        y = np.repeat(np.arange(num_classes), n)
        return (means[y] + rng.normal(0, noise, (len(y), dim))).astype(np.float32), y.astype(np.int32)
    return (*draw(per_class), *draw(per_class // 2))


def make_search(candidates, dim, num_classes, patience=4, first_rung=10_000, hidden=0, **train):
    config = Config()
    config.head.hidden_units = hidden
    config.train.patience = patience
    for key, value in train.items():
        setattr(config.train, key, value)
    head = build_head(num_classes, dim, config.head, 0)
    search = build_search(candidates, head, config, HeadBudget(10_000, 1), num_classes)
    search.policy = SearchPolicy(patience, first_rung)
    return search, head


def train(search, x, y, steps, batch=20, evaluate_every=5, val=None, start=0, seed=0):
    order, weights = BatchOrder(len(y), batch, seed), tf.ones(batch)
    for step in range(start, start + steps):
        if search.done():
            break
        rows = order.indices(step)
        search.train_step(tf.constant(search.standardize(x[rows])), tf.constant(y[rows]), weights,
                          tf.constant([seed, step], tf.int64))
        if val is not None and (step + 1) % evaluate_every == 0:
            search.evaluate(step + 1, search.standardize(val[0]), val[1])


def test_a_stacked_candidate_trains_exactly_like_a_keras_rmsprop_head():
    x, y, _, _ = blobs()
    config = Config()
    config.train.learning_rate = 3e-3
    search, _ = make_search([Candidate(1e-3, 0.0), Candidate(3e-3, 0.0)], x.shape[1], 6)
    reference = build_head(6, x.shape[1], config.head, 0)
    reference.logits.kernel.assign(search.heads.weights[0][:, 1].numpy())
    reference.logits.bias.assign(search.heads.weights[1][1].numpy())
    optimizer = build_optimizer(config.train, reference.trainable_variables)
    order = BatchOrder(len(y), 20, 0)
    for step in range(30):
        rows = order.indices(step)
        features = tf.constant(search.standardize(x[rows]))
        search.train_step(features, tf.constant(y[rows]), tf.ones(20), tf.constant([0, step], tf.int64))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
                y[rows], reference(features), from_logits=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, reference.trainable_variables),
                                      reference.trainable_variables))
    np.testing.assert_allclose(search.heads.weights[0][:, 1].numpy(), reference.logits.kernel.numpy(),
                               rtol=1e-4, atol=1e-5)


def test_the_best_validation_step_is_kept_not_the_last():
    # few, noisy training points and many dimensions: the head overfits, validation loss turns up
    x, y, vx, vy = blobs(num_classes=4, dim=200, per_class=5, noise=1.0, separation=0.15)
    search, head = make_search([Candidate(1e-3, 0.0)], 200, 4, patience=1000)
    train(search, x, y, 400, batch=8, evaluate_every=5, val=(vx, vy))
    record = search.record
    best_step = int(record.best_step[0])
    assert 0 < best_step < 400, best_step
    loss_now, _ = search.heads.evaluate(search.standardize(vx), vy)
    assert loss_now[0] > float(record.best_loss[0])
    search.write_selected(head)
    logits = head(tf.constant(vx)).numpy()
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(vy, logits)).numpy()
    assert loss == pytest.approx(float(record.best_loss[0]), rel=1e-4)


def test_a_diverging_candidate_stops_and_the_others_go_on(caplog):
    x, y, vx, vy = blobs()
    search, _ = make_search([Candidate(1e38, 0.0), Candidate(1e-3, 0.0)], x.shape[1], 6)
    train(search, x, y, 40, val=(vx, vy))
    status = search.record.status.numpy()
    assert status[0] == STOPPED and status[1] == TRAINING
    assert all(np.isfinite(w.numpy()).all() for w in search.heads.weights)
    assert "diverged" in caplog.text


def test_candidates_that_stall_for_patience_evaluations_stop_and_end_the_search():
    x, y, vx, vy = blobs(noise=0.3)
    search, _ = make_search([Candidate(1e-2, 0.0), Candidate(3e-2, 0.0)], x.shape[1], 6, patience=3)
    train(search, x, y, 5000, val=(vx, vy))
    assert search.done() and set(search.record.status.numpy()) == {STOPPED}
    assert search.heads.learning_rates.numpy().max() < 3e-2, "stalled learning rates are halved"


def test_successive_halving_keeps_the_best_third_at_each_rung():
    x, y, vx, vy = blobs()
    grid = [Candidate(lr, 0.0) for lr in (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)]
    search, _ = make_search(grid, x.shape[1], 6, patience=1000, first_rung=10)
    train(search, x, y, 10, val=(vx, vy))
    status, losses = search.record.status.numpy(), search.record.best_loss.numpy()
    assert (status == PRUNED).sum() == 4
    assert set(np.flatnonzero(status != PRUNED)) == set(np.argsort(losses)[:2])


def test_the_soup_averages_only_candidates_that_lower_validation_loss():
    x, y, vx, vy = blobs(noise=3.0)
    grid = [Candidate(lr, wd) for lr in (1e-3, 3e-3) for wd in (0.0, 0.05)] + [Candidate(1e-6, 0.0)]
    search, head = make_search(grid, x.shape[1], 6, patience=1000)
    train(search, x, y, 200, val=(vx, vy))
    members = search.soup(search.standardize(vx), vy)
    assert members[0] == search.record.leader()
    assert 4 not in members, "a candidate that barely trained must not be averaged in"
    search.write_selected(head, search.standardize(vx), vy)
    soup_loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(vy, head(tf.constant(vx)))).numpy()
    assert soup_loss <= float(search.record.best_loss.numpy().min()) + 1e-6


def test_evaluating_the_same_step_twice_changes_nothing():
    x, y, vx, vy = blobs()
    search, _ = make_search([Candidate(1e-3, 0.0), Candidate(1e-2, 0.0)], x.shape[1], 6, patience=2)
    train(search, x, y, 20, val=(vx, vy))
    before = [v.numpy().copy() for v in search.record.variables + search.heads.variables]
    search.evaluate(20, search.standardize(vx), vy)
    after = [v.numpy() for v in search.record.variables + search.heads.variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("hidden", [0, 8])
def test_a_search_resumed_from_a_mid_search_checkpoint_ends_bit_identical(tmp_path, hidden):
    x, y, vx, vy = blobs()
    grid = [Candidate(lr, wd) for lr in (1e-3, 1e-2) for wd in (0.0, 0.1)]
    settings = dict(patience=3, first_rung=30, hidden=hidden)

    def checkpoint(search, head):
        return tf.train.Checkpoint(head=head, search=search.heads, search_record=search.record)

    unbroken, unbroken_head = make_search(grid, x.shape[1], 6, **settings)
    train(unbroken, x, y, 120, val=(vx, vy))

    first, first_head = make_search(grid, x.shape[1], 6, **settings)
    train(first, x, y, 47, val=(vx, vy))  # between evaluations and before the rung
    path = checkpoint(first, first_head).write(str(tmp_path / "ckpt"))
    resumed, resumed_head = make_search(grid, x.shape[1], 6, **settings)
    checkpoint(resumed, resumed_head).read(path).assert_consumed()
    train(resumed, x, y, 120 - 47, val=(vx, vy), start=47)

    for a, b in zip(unbroken.heads.variables + unbroken.record.variables,
                    resumed.heads.variables + resumed.record.variables):
        assert np.array_equal(a.numpy(), b.numpy()), a.name
    assert (unbroken.record.status.numpy() == PRUNED).any()


def test_the_budget_is_epochs_over_the_training_split():
    config = Config()
    assert head_budget(config.train, 500) == HeadBudget(1000, 10)            # tiny: at least 1000 steps
    assert head_budget(config.train, 500_000) == HeadBudget(500_000, 5000)   # 100 epochs, validate per epoch
    config.train.steps = 123
    assert head_budget(config.train, 500_000).steps == 123


def test_the_default_grid_spans_a_100x_learning_rate_range_and_includes_no_weight_decay():
    grid = candidate_grid(1000)
    rates = sorted({c.learning_rate for c in grid})
    assert rates[-1] / rates[0] >= 30
    assert 0.0 in {c.weight_decay for c in grid} and len({c.weight_decay for c in grid}) >= 3


def test_a_diverging_configured_head_stops_with_exit_2_and_nothing_non_finite_is_saved(clothing_run, tmp_path):
    from tests.helpers import checkpoint_values, local_mobilenet_args, run_resume
    _, cache_dir, _ = clothing_run
    run_dir = tmp_path / "run"
    result = run_resume(*local_mobilenet_args(run_dir, cache_dir, "head.search=off", "train.learning_rate=1e38",
                                              "train.steps=200", "checkpoint.every_steps=1", "export.enabled=true"))
    assert result.returncode == 2, result.stdout
    assert "head training diverged at step" in result.stdout and "Lower train.learning_rate" in result.stdout
    step = int(result.stdout.split("diverged at step ")[1].split(":")[0])
    markers = sorted((run_dir / "checkpoints").glob("ckpt-*.json"))
    assert all(int(m.stem.split("-")[1]) < step for m in markers)
    for marker in markers:
        for name, value in checkpoint_values(str(marker.with_suffix(""))).items():
            assert np.isfinite(value).all() if value.dtype.kind == "f" else True, name
    assert not (run_dir / "summary.json").exists() and not (run_dir / "export").exists()


def test_xla_compiles_the_step_of_large_heads_without_dropout_only():
    from runner.training.search import xla_pays_off
    assert xla_pays_off(1280, 1000, 0, 0.0) and xla_pays_off(2048, 100, 0, 0.0)
    assert xla_pays_off(1280, 1000, 128, 0.0)
    assert not xla_pays_off(256, 10, 0, 0.0) and not xla_pays_off(256, 10, 128, 0.0)
    assert not xla_pays_off(1280, 1000, 0, 0.3) and not xla_pays_off(1280, 1000, 128, 0.3)


def test_the_xla_step_and_the_plain_step_train_a_large_head_alike():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 1024)).astype(np.float32)
    y = rng.integers(0, 100, 40).astype(np.int32)
    runs = []
    for use_plain in (False, True):
        search, _ = make_search(candidate_grid(1000)[:3], 1024, 100)
        assert search.heads.uses_xla
        if use_plain:
            search.heads._step_fn = search.heads._plain_step
        train(search, x, y, steps=6)
        runs.append([w.numpy() for w in search.heads.weights])
    for xla_weights, plain_weights in zip(*runs):
        np.testing.assert_allclose(xla_weights, plain_weights, rtol=1e-4, atol=1e-5)
