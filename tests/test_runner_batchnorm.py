"""BatchNorm models run and sweep: the running statistics are threaded through training, checkpointed (a resumed
run equals an uninterrupted one, evaluation included) and used for evaluation; a sweep member equals its run."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd import data as qdata
from quotient_sgd.config import ConfigError, load_config, validate
from quotient_sgd.runner import run, sweep
from quotient_sgd.runner._build import build, init_model, regauge
from quotient_sgd.runner._chunk import hyper_of, init_program, single_programs
from quotient_sgd.runner._sweep import member_settings, sweep_members

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _settings(**over):
    c = load_config(os.path.join(ROOT, "configs", "digits_bn_cnn.py"))
    c.steps = 20
    c.model.channels = (4, 8)
    c.data.batch_size = 32
    c.observables.names = ("loss", "grad_norm", "charges", "angular_update")
    c.observables.every = 5
    c.observables.hessian_every = 10
    c.observables.lanczos_steps = 4
    c.checkpoint.every = 10
    c.logging.plots = False
    c.logging.progress = False
    c.sweep.lr = (0.05, 0.1)
    for k, v in over.items():
        c.update_from_flattened_dict({k: v})
    return validate(c)


def _rows(d):
    with open(os.path.join(d, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_running_statistics_are_trained_and_used_for_evaluation():
    s = _settings()
    b = build(s)
    assert b.stateful
    init, chunk = init_program(b), single_programs(b, 10)
    state0 = init(jnp.int32(0), jnp.float32(0), *hyper_of(s))
    state, traj, ev = chunk(state0, jnp.int32(0), None, b.dataset, jnp.int32(0))
    assert np.isfinite(np.asarray(traj["loss"])).all() and np.isfinite(np.asarray(traj["sharpness_raw"])).all()
    means = [np.asarray(x) for x in jax.tree.leaves(state[2])]
    assert any(np.abs(m).max() > 1e-3 for m in means), "the running statistics did not move"
    # evaluation normalises with the running statistics: fresh ones give a different test loss
    test = qdata.full_batch(b.dataset, "test")
    evaluate = jax.jit(b.eval_fn)  # one program for both calls (op by op, each op compiled: ~7x the CPU time)
    fresh = evaluate(state[0], test, state0[2])["loss"]
    np.testing.assert_allclose(ev["test_loss"], evaluate(state[0], test, state[2])["loss"], rtol=1e-6)
    assert abs(float(fresh) - float(ev["test_loss"])) > 1e-4


def test_init_gauge_moves_the_running_statistics_with_the_parameters():
    """Re-gauging a BatchNorm CNN keeps its evaluation-mode function: the per-channel scale of a conv's output
    moves the running mean and variance of the BatchNorm it feeds (mean -> c mean, var -> c^2 var)."""
    s = _settings()
    b = build(s)
    test = qdata.full_batch(b.dataset, "test")
    train = dict(qdata.full_batch(b.dataset, "train"))
    train.setdefault("w", jnp.ones(train["y"].shape[0]))

    @functools.partial(jax.jit, static_argnums=2)
    def outputs(p, ms, train_mode=False):  # log-probabilities (evaluation mode: with the running statistics)
        model = nnx.merge(b.graphdef, p, ms)
        if not train_mode:
            model.eval()
        return model(test["x"])

    evaluate = jax.jit(b.eval_fn)
    loss = jax.jit(lambda p, ms: b.loss_fn(p, ms, train)[0])  # (compiled once for both checks)

    def check(pg, msg, p, ms):
        # float32 rounding through factors up to e^4: the training-mode function (a symmetry all along) moves
        # by ~2e-5 per output; evaluation mode must move no more (unmapped statistics move it by ~1e-1)
        np.testing.assert_allclose(outputs(pg, msg, True), outputs(p, ms, True), rtol=1e-4)
        np.testing.assert_allclose(outputs(pg, msg), outputs(p, ms), rtol=1e-4)
        np.testing.assert_allclose(evaluate(pg, test, msg)["loss"], evaluate(p, test, ms)["loss"], rtol=1e-5)
        np.testing.assert_allclose(loss(pg, msg), loss(p, ms), rtol=1e-5)

    p0, ms0 = init_model(b, jnp.int32(0), jnp.float32(0.0))
    p2, ms2 = init_model(b, jnp.int32(0), jnp.float32(2.0))
    assert max(float(jnp.max(jnp.abs(a - c))) for a, c in zip(jax.tree.leaves(p0), jax.tree.leaves(p2))) > 0.1
    check(p2, ms2, p0, ms0)
    # running statistics away from their initial (0, 1), updated by training-mode calls: the same map holds
    @jax.jit
    def updated(p, ms):
        model = nnx.merge(b.graphdef, p, ms)
        for i in range(3):
            model(train["x"][64 * i:64 * (i + 1)])
        return nnx.split(model, nnx.Param, ...)[1:]

    p, ms = updated(p0, ms0)
    pg, msg = regauge(b, jax.random.key(7), p, ms, 2.0)
    assert any(float(jnp.max(jnp.abs(a - c))) > 0.1 for a, c in zip(jax.tree.leaves(ms), jax.tree.leaves(msg)))
    check(pg, msg, p, ms)


def test_batchnorm_run_resumes_and_sweep_equals_runs(tmp_path):
    s = _settings(**{"observables.hessian_every": 0})  # the Hessian with batch statistics: the test above
    ms = member_settings(s, 1, sweep_members(s)[1])
    wd, ref = str(tmp_path / "r"), str(tmp_path / "ref")
    run(ms, wd, max_chunks=1)
    resumed = run(ms, wd)
    full = run(ms, ref)
    assert resumed.resumed_from == 10
    for k in full.trajectory:
        np.testing.assert_array_equal(resumed.trajectory[k], full.trajectory[k], err_msg=k)
    assert _rows(wd) == _rows(ref)  # the evaluation rows (running statistics) too

    res = sweep(s, str(tmp_path / "sw"), devices=jax.devices()[:1])  # members per device decided
    with np.load(os.path.join(res.member_dirs[1], "trajectory.npz")) as z:
        for k in z.files:
            np.testing.assert_allclose(z[k], full.trajectory[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert res.measured_cost["unamortised_fraction"] > 0
    ra, rb = _rows(res.member_dirs[1]), _rows(ref)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    np.testing.assert_allclose([r["test_loss"] for r in ra if "test_loss" in r],
                               [r["test_loss"] for r in rb if "test_loss" in r], rtol=1e-5)


@pytest.mark.parametrize("over,needles", [
    ({"observables.per_example_grads": True}, ["config.observables.per_example_grads", "norm='batch'",
                                               "batch statistics"]),
    ({"sweep.batch_size": (16, 32)}, ["config.sweep.batch_size", "mask", "batch statistics"]),
])
def test_what_batch_statistics_rule_out_is_refused(over, needles):
    with pytest.raises(ConfigError) as e:
        _settings(**over)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_gauge_fix_with_batch_norm_keeps_the_evaluation_function(tmp_path):
    """``symmetry.mode='gauge_fix'`` on a BatchNorm CNN: the runner moves the running statistics with every
    re-gauging (``train(act_on_model_state=...)``), so at a negligible learning rate the evaluation rows equal
    those of the same run without gauge fixing, although the parameters moved to their canonical point."""
    over = {"steps": 4, "checkpoint.every": 4, "observables.hessian_every": 0, "observables.every": 4,
            "observables.names": ("loss",), "optim.lr": 1e-9, "optim.momentum": 0.0}
    rows = {}
    for mode in ("observe", "gauge_fix"):
        s = _settings(**over, **{"symmetry.mode": mode})
        assert (build(s).act_on_model_state is not None) == (mode == "gauge_fix")
        rows[mode] = [r for r in _rows(run(s, str(tmp_path / mode)).workdir) if "test_loss" in r][-1]
    for k in ("test_loss", "test_accuracy", "train_loss"):
        np.testing.assert_allclose(rows["gauge_fix"][k], rows["observe"][k], rtol=1e-4, err_msg=k)
