"""Diagnostics on real short runs: shock_aware_lr across an exactly zero update, and the detectors on full-batch
GD runs whose transitions are known from the trajectory itself (edge of stability, catapult, quiet runs)."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from threadpoolctl import threadpool_limits

from quotient_sgd import models
from quotient_sgd.data import teacher_student
from quotient_sgd.diagnostics import ALL_KINDS, LiveDetector, detect, shock_aware_lr
from quotient_sgd.optim import SGDSpec, quotient_trajectory, set_hyperparams, train


def _quad_run(tx, h, steps):
    """Plain loop of ``tx`` on ``0.5 sum(h w^2)`` from ``w = 1``; the states after each step."""
    p = jnp.ones_like(h)
    st, out = tx.init(p), []
    for _ in range(steps):
        u, st = tx.update(h * p, st, p)
        p = p + u
        out.append(st)
    return out


def test_shock_aware_lr_keeps_the_known_curvature_across_a_zero_update():
    """1-d quadratic of curvature 6, lr 0.5, fold cap 1.5: every measured kappa is exactly 6 and every capped scale
    1.5 / (0.5 * 6) = 0.5.  A step with lr 0 (update exactly 0) measures nothing: the step after it keeps kappa = 6
    and the scale 0.5 (it took the init_scale 1, fold number 3 > 2, and averaged a kappa of 0 in)."""
    h = jnp.asarray([6.0])
    lr = lambda c: jnp.where(c == 3, 0.0, 0.5)  # noqa: E731
    for decay in (0.0, 0.5):
        sts = _quad_run(shock_aware_lr(optax.sgd(lr), fold_target=1.5, curvature_decay=decay), h, 7)
        for k in (1, 2, 4, 5, 6):  # every step with a known curvature and a nonzero proposed step
            np.testing.assert_allclose(float(sts[k].curvature), 6.0, rtol=1e-5, err_msg=f"{decay=} step {k}")
            np.testing.assert_allclose(float(sts[k].scale), 0.5, rtol=1e-5, err_msg=f"{decay=} step {k}")
            np.testing.assert_allclose(float(sts[k].fold_number), 1.5, rtol=1e-5, err_msg=f"{decay=} step {k}")
        assert float(sts[3].fold_number) == 0.0  # the zero step itself folds nothing
        np.testing.assert_allclose(float(sts[3].curvature), 6.0, rtol=1e-5)


def test_shock_aware_lr_moving_average_starts_at_the_first_measurement():
    """A warm-up from lr 0 (first update exactly 0): no curvature is known until the parameters move, then the
    moving average starts from the first measured kappa = 6 (it started from 0: kappa 0.6 with decay 0.9, and the
    step went through uncapped)."""
    h = jnp.asarray([6.0])
    tx = shock_aware_lr(optax.sgd(optax.linear_schedule(0.0, 0.5, 2)), fold_target=1.5, curvature_decay=0.9)
    sts = _quad_run(tx, h, 4)
    assert float(sts[0].scale) == float(sts[1].scale) == 1.0  # init_scale: nothing measured yet
    for k in (2, 3):
        np.testing.assert_allclose(float(sts[k].curvature), 6.0, rtol=1e-5)
        np.testing.assert_allclose(float(sts[k].fold_number), 1.5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# the detectors on real full-batch GD runs: a 4-16-16-1 ReLU MLP on teacher-student regression (64 examples), the
# Hessian's top eigenvalue recorded at every step (horizontal and raw), one compiled run for every learning rate
# (injected) and initialisation; ground truth from the recorded parameters (exact dense Hessians)

_STEPS = 30


def _mse_and_params(graphdef, p, batch):
    pred = nnx.merge(graphdef, p)(batch[0])
    return 0.5 * jnp.mean(jnp.sum(jnp.square(pred - batch[1]), axis=-1)), jax.flatten_util.ravel_pytree(p)[0]


def _full_batch(batch, step, key):
    return batch


def _mlp(seed, hidden=(16, 16)):
    return models.MLP(4, hidden, 1, activation="relu", rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def gd_runs():
    """``run(seed, eta_lambda0) -> (traj, lr, flat params per step, exact Hessian fn, group)``: full-batch GD at
    ``lr = eta_lambda0 / lambda_max(H(theta_0))``."""
    ds = teacher_student(seed=0, n_train=64, n_test=1, din=4)
    batch = (ds.x_train, 3.0 * ds.y_train)
    model = _mlp(0)
    graphdef, p = nnx.split(model, nnx.Param)
    group = model.symmetries()
    loss_fn = functools.partial(_mse_and_params, graphdef)
    data = functools.partial(_full_batch, batch)
    tx = quotient_trajectory(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), group,
                             observables=("curvature", "fold_number", "shock_number"), hessian_every=1,
                             hessian_at=("horizontal", "raw"), spec=SGDSpec("learning_rate"))
    unravel = jax.flatten_util.ravel_pytree(p)[1]
    hessian = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), batch)[0]))

    def run(seed, eta_lambda0):
        p0 = nnx.split(_mlp(seed), nnx.Param)[1]
        f0 = jax.flatten_util.ravel_pytree(p0)[0]
        with threadpool_limits(1):  # (one BLAS thread, as in _exact_tops below)
            lr = eta_lambda0 / float(np.linalg.eigvalsh(np.asarray(hessian(f0), np.float64))[-1])
        state = set_hyperparams(tx.init(p0), learning_rate=lr)
        _, _, traj = train(loss_fn, p0, tx, data, num_steps=_STEPS, opt_state=state, has_aux=True, donate=False)
        traj = jax.tree.map(np.asarray, traj)
        return traj, float(np.float32(lr)), traj.pop("aux"), hessian, group, unravel

    return run


def _first(mask) -> int:
    hit = np.nonzero(mask)[0]
    return int(hit[0]) if hit.size else -1


def test_edge_of_stability_and_its_catapult_found_at_the_steps_of_the_trajectory(gd_runs):
    """Progressive sharpening to the edge: lr * lambda_max rises from 1.3 to 2 by step 5 (the run of seed 2 at
    lr = 1.9 / lambda_0); the level-2 edge_of_stability events (raw, and step: the horizontal Hessian) are at the
    first step whose exact top eigenvalue (a dense float64 eigendecomposition of the Hessian at the recorded
    parameters; the horizontal one of P H P with P the projection off the orbit tangents) reaches 2 / lr.  The
    edge then spikes the loss (catapult): the event is at the first step whose loss exceeds twice the lowest loss
    before it, confirmed (one record against one: the sharpness's noise is ~1 % of it) at the first step whose
    exact sharpness is below 0.8 times that at the onset, and there below 2 / lr."""
    traj, lr, flat, hessian, group, unravel = gd_runs(2, 1.9)

    def exact(rows):
        hs = [np.asarray(hessian(jnp.asarray(f)), np.float64) for f in flat[rows]]
        with threadpool_limits(1):
            return _exact_tops(flat[rows], hs)

    def _exact_tops(fs, hs):
        # (one BLAS thread: on a loaded machine OpenBLAS's threads made each 369 x 369 eigvalsh take seconds)
        raw, hor = [], []
        for f, h in zip(fs, hs):
            tangents = group.tangents(unravel(jnp.asarray(f)))  # one per generator, on a leading axis
            v = np.asarray(jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(tangents), np.float64)
            q = np.linalg.qr(v.T)[0]
            proj = np.eye(len(f)) - q @ q.T
            raw.append(np.linalg.eigvalsh(h)[-1])
            hor.append(np.linalg.eigvalsh(proj @ h @ proj)[-1])
        return np.asarray(raw), np.asarray(hor)

    # the recorded (Lanczos) crossing; Lanczos bounds lambda_max from below, so the exact eigenvalues up to it
    # decide the first exact crossing
    rec = _first(lr * traj["sharpness_raw"] >= 2.0)
    assert 1 <= rec < 10
    lam, lam_h = exact(np.arange(rec + 1))
    np.testing.assert_allclose(traj["sharpness_raw"][:rec + 1], lam, rtol=1e-4)
    np.testing.assert_allclose(traj["sharpness_horizontal"][:rec + 1], lam_h, rtol=1e-4)
    events = detect(traj, lr=lr)
    for variant, ex in (("raw", lam), ("step", lam_h)):
        truth = _first(lr * ex >= 2.0)
        assert truth >= 1 and np.all(np.abs(lr * ex[truth - 1:truth + 1] - 2.0) > 1e-3)  # unambiguous in float32
        got = [e.step for e in events if e.kind == "edge_of_stability" and e.variant == variant
               and e.details["level"] == 2.0]
        assert got and got[0] == truth, (variant, got, truth)
    # the catapult that follows
    loss = traj["loss"]
    spike = 1 + _first(loss[1:] > 2.0 * np.minimum.accumulate(loss)[:-1])
    assert spike > rec
    cat = [e for e in events if e.kind == "catapult" and e.variant == "raw"]
    assert [e.step for e in cat] == [spike]
    after = np.arange(spike, min(spike + 8, _STEPS))
    lam_after = exact(after)[0]
    fall = _first(lam_after < 0.8 * lam_after[0])
    assert fall > 0 and lr * lam_after[fall] < 2.0
    d = cat[0].details
    assert d["window_before"] == d["window_after"] == 1
    assert d["confirm_step"] == after[fall]
    assert not any(e.kind == "divergence" for e in events)


def test_no_events_on_quiet_runs(gd_runs):
    """Nothing happens: GD at lr = 0.3 / lambda_0 on the MLP (lr * lambda_max stays near 0.3, the loss falls
    monotonically), and GD on a linear regression (convex, lr * lambda = 0.5 at every step).  No event of any
    stability / spike kind; on the convex problem no event at all.  (The CUSUM ``transition`` detector is left out
    on the MLP: the deterministic full-batch loss's log-rate drifts smoothly, outside its premise of a stationary
    rate, and it raises alarms there.)"""
    traj, lr, *_ = gd_runs(0, 0.3)
    loss = traj["loss"]
    assert np.all(np.diff(loss) < 0) and np.max(lr * traj["sharpness_raw"]) < 0.5
    kinds = [k for k in ALL_KINDS if k != "transition"]
    assert detect(traj, lr=lr, kinds=kinds) == []
    # convex: least squares on the same data, no hidden layer
    ds = teacher_student(seed=0, n_train=64, n_test=1, din=4)
    x, y = ds.x_train, 3.0 * ds.y_train
    x1 = np.c_[np.asarray(x, np.float64), np.ones(len(x))]  # the Hessian of the mean squared error, with the bias
    lam = float(np.linalg.eigvalsh(x1.T @ x1 / len(x))[-1])
    lr = 0.5 / lam
    model = _mlp(0, hidden=())
    graphdef, p0 = nnx.split(model, nnx.Param)
    tx = quotient_trajectory(optax.sgd(lr), model.symmetries(), observables=("curvature", "fold_number"),
                             hessian_every=1, hessian_at=("raw",), spec=SGDSpec(lr))
    _, _, traj = train(functools.partial(_mse_and_params, graphdef), p0, tx, functools.partial(_full_batch, (x, y)),
                       num_steps=_STEPS, has_aux=True, donate=False)
    traj = jax.tree.map(np.asarray, traj)
    traj.pop("aux")
    np.testing.assert_allclose(lr * traj["sharpness_raw"], 0.5, rtol=1e-4)
    loss = traj["loss"]
    assert np.all(np.diff(loss) <= 1e-6 * loss[:-1])  # falls to its minimum (then flat up to float32 rounding)
    assert detect(traj, lr=lr) == []


def test_live_detection_equals_detection_on_the_whole_run(gd_runs):
    """Past the edge from the start (seed 1, lr = 2.5 / lambda_0): early loss spikes at steps 2 and 4 while the
    sharpness oscillates at the edge.  A LiveDetector with the run's horizon, fed chunks of any size, reports the
    events detect gives on the whole run (it confirmed two catapults there that detect does not: their noise was
    measured on the records so far, 0.30 on 20, instead of on the first 32, 0.89)."""
    traj, lr, *_ = gd_runs(1, 2.5)
    full = detect(traj, lr=lr, horizon=_STEPS)
    assert any(e.kind == "loss_spike" and e.step < 10 for e in full)  # the early spikes are there
    key = lambda e: (e.step, e.kind, e.variant, e.strength)  # noqa: E731
    for chunk in (1, 10, 20):
        live = LiveDetector(lr=lr, horizon=_STEPS)
        for s in range(0, _STEPS, chunk):
            live.update(jax.tree.map(lambda v, s=s: v[s:s + chunk], traj))
        assert sorted(map(key, live.events)) == sorted(map(key, full)), chunk
