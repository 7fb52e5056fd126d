"""Adam's edge of stability: the threshold ``adam_edge(b1) = 2 (1 + b1) / (1 - b1)`` of the frozen-preconditioner
iteration, the preconditioned sharpness ``lambda_max(P^-1 H)`` that ``quotient_trajectory`` records against a
dense reference, its detection, and the phenomenon itself (Cohen et al. 2022) on a small full-batch regression."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from helpers import load_trajectory, tiny_settings
from quotient_sgd.diagnostics import LiveDetector, adam_edge, detect, detect_edge_of_stability
from quotient_sgd.diagnostics._live import _options_from_config
from quotient_sgd.observables import kind_of
from quotient_sgd.optim import adam_preconditioner, quotient_trajectory, train
from quotient_sgd.symmetry import Product, Rescale

# ---- the threshold ---------------------------------------------------------------------------------------------


def _frozen_adam_map(h, p, eta, b1):
    """The linear map of ``(theta, m)`` under Adam with frozen ``P = diag(p)`` on ``L = theta^T diag(h) theta / 2``:
    ``m+ = b1 m + (1 - b1) H theta``, ``theta+ = theta - eta P^-1 m+``."""
    n = len(h)
    hm, pinv, eye = np.diag(h), np.diag(1 / p), np.eye(n)
    m_row = np.hstack([(1 - b1) * hm, b1 * eye])
    t_row = np.hstack([eye, np.zeros((n, n))]) - eta * pinv @ m_row
    return np.vstack([t_row, m_row])


@pytest.mark.parametrize("b1", [0.0, 0.5, 0.9, 0.99])
def test_adam_edge_is_where_the_frozen_preconditioner_iteration_turns_unstable(b1):
    rng = np.random.default_rng(int(100 * b1))
    h = rng.uniform(0.1, 5.0, 6)
    p = rng.uniform(1e-3, 1.0, 6)
    top = np.max(h / p)  # lambda_max(P^-1 H) of a diagonal pair
    for factor, stable in ((1 - 1e-3, True), (1 + 1e-3, False)):
        eta = factor * adam_edge(b1) / top
        radius = np.max(np.abs(np.linalg.eigvals(_frozen_adam_map(h, p, eta, b1))))
        assert (radius < 1) == stable, (b1, factor, radius)
    assert adam_edge(0.9) == pytest.approx(38.0)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), True, "0.9"])
def test_adam_edge_rejects_b1_outside_0_1(bad):
    with pytest.raises(ValueError, match=r"b1=.*\[0, 1\)"):
        adam_edge(bad)


# ---- the recorded preconditioned sharpness ---------------------------------------------------------------------


@pytest.fixture
def adam_x64(x64):
    """float64, with standard dtype promotion: optax's bias correction (``b ** count``) mixes a Python float and
    int32, which strict promotion refuses (the package's own code runs under strict promotion:
    :func:`test_preconditioner_errors` calls the preconditioner outside this fixture)."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def _problem(din=3, h=4, n=24):
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (n, din), jnp.float64)
    y = jax.random.normal(ky, (n, 2), jnp.float64)
    k1, k2 = jax.random.split(kp)
    p0 = {"l0": {"kernel": jax.random.normal(k1, (din, h), jnp.float64) / np.sqrt(din),
                 "bias": jnp.zeros(h, jnp.float64)},
          "l1": {"kernel": jax.random.normal(k2, (h, 2), jnp.float64) / np.sqrt(h),
                 "bias": jnp.zeros(2, jnp.float64)}}
    return p0, (x, y)


def _loss(p, batch):
    x, y = batch
    out = jnp.tanh(x @ p["l0"]["kernel"] + p["l0"]["bias"][None, :]) @ p["l1"]["kernel"] + p["l1"]["bias"][None, :]
    return 0.5 * jnp.mean(jnp.sum(jnp.square(out - y), axis=-1))


def _group():
    return Product([Rescale(incoming=((("l0", "kernel"), 1), (("l0", "bias"), 0)), outgoing=((("l1", "kernel"), 0),),
                            name="r")])


def _adam_state(inner_state):
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (st,) = [x for x in jax.tree.leaves(inner_state, is_leaf=is_adam) if is_adam(x)]
    return st


def _dense_reference(params, batch, adam_state, b1=0.9, b2=0.999, eps=1e-8):
    """Extreme eigenvalues of the dense ``P^-1/2 H P^-1/2``: ``H`` by ``jax.hessian``, ``P`` by hand from Adam's
    ``count`` and ``nu`` (``P = (1 - b1^t)(sqrt(nu / (1 - b2^t)) + eps)``)."""
    flat, unravel = ravel_pytree(params)
    hess = jax.hessian(lambda f: _loss(unravel(f), batch))(flat)
    t = adam_state.count.astype(flat.dtype)
    nu = ravel_pytree(adam_state.nu)[0]
    p = (1 - b1**t) * (jnp.sqrt(nu / (1 - b2**t)) + eps)
    ev = jnp.linalg.eigvalsh(hess / jnp.sqrt(p)[:, None] / jnp.sqrt(p)[None, :])
    return ev[-1], ev[0]


def _clipped_adamw(learning_rate):
    return optax.chain(optax.clip_by_global_norm(0.3), optax.adamw(learning_rate, weight_decay=1e-2))


@pytest.mark.parametrize("inner", ["adam", "inject(chain(clip, adamw))"])
def test_recorded_preconditioned_sharpness_is_the_dense_top_eigenvalue(adam_x64, inner):
    """At every refresh, ``sharpness_preconditioned`` / ``lambda_min_preconditioned`` equal the extreme
    eigenvalues of the dense ``P^-1/2 H P^-1/2`` at ``theta_k``, with ``P`` from the Adam state after step ``k``
    (the one that step divided by) of an unwrapped copy of the optimiser; between refreshes the last value is
    held, as for the other Hessian keys; the wrapped optimiser's updates are the unwrapped one's."""
    p0, batch = _problem()

    def make():
        return optax.adam(0.02) if inner == "adam" else optax.inject_hyperparams(_clipped_adamw)(learning_rate=0.02)

    tx = quotient_trajectory(make(), _group(), observables=("loss",), hessian_every=3,
                             hessian_at=("preconditioned",), preconditioner=adam_preconditioner(), lanczos_steps=20)
    ref = make()

    @jax.jit
    def step(params, state, ref_state):
        value, grads = jax.value_and_grad(_loss)(params, batch)
        upd, state = tx.update(grads, state, params, value=value, loss_fn=functools.partial(_loss, batch=batch))
        ref_upd, ref_state = ref.update(grads, ref_state, params)
        dense = _dense_reference(params, batch, _adam_state(ref_state))
        gap = ravel_pytree(upd)[0] - ravel_pytree(ref_upd)[0]
        return optax.apply_updates(params, upd), state, ref_state, dense, jnp.max(jnp.abs(gap))

    state, ref_state, params = tx.init(p0), ref.init(p0), p0
    held = None
    for k in range(7):
        params, state, ref_state, (top, bottom), gap = step(params, state, ref_state)
        assert float(gap) < 1e-14  # (the two programs may fuse the arithmetic differently)
        o = state.observables
        if k % 3 == 0:
            np.testing.assert_allclose(float(o["sharpness_preconditioned"]), float(top), rtol=1e-6)
            np.testing.assert_allclose(float(o["lambda_min_preconditioned"]), float(bottom), rtol=1e-6, atol=1e-9)
            assert int(o["hessian_step"]) == k and float(top) > 1.0 and float(bottom) < float(top)
            held = float(o["sharpness_preconditioned"])
        else:
            assert float(o["sharpness_preconditioned"]) == held
    # declared, and declared raw: a diagonal P in parameter coordinates does not follow the orbit
    assert {kind_of(k) for k in o if k.endswith("_preconditioned")} == {"raw"} and len(o) == 6


def test_preconditioned_sharpness_under_vmap_over_learning_rates(adam_x64):
    """``train`` vmapped over three injected learning rates records the same ``sharpness_preconditioned`` as
    three separate runs."""
    p0, batch = _problem()
    tx = quotient_trajectory(optax.inject_hyperparams(optax.adam)(learning_rate=0.01), _group(),
                             observables=("loss",), hessian_every=2, hessian_at=("preconditioned",),
                             preconditioner=adam_preconditioner(), lanczos_steps=10)
    lrs = jnp.asarray([0.005, 0.02, 0.05], jnp.float64)

    def run(lr):
        st = tx.init(p0)
        st = st._replace(inner_state=st.inner_state._replace(
            hyperparams={**st.inner_state.hyperparams, "learning_rate": lr}))
        return train(_loss, p0, tx, lambda step, key: batch, num_steps=4, opt_state=st, donate=False)[2]

    batched = jax.jit(jax.vmap(run))(lrs)["sharpness_preconditioned"]
    one = jax.jit(run)
    single = np.stack([np.asarray(one(lr)["sharpness_preconditioned"]) for lr in lrs])
    assert np.isfinite(single).all() and single[0, -1] != single[2, -1]
    np.testing.assert_allclose(np.asarray(batched), single, rtol=1e-9)


def test_preconditioner_errors(x64):
    p0, _ = _problem()
    with pytest.raises(ValueError, match="'preconditioned', which needs preconditioner="):
        quotient_trajectory(optax.adam(0.01), _group(), hessian_every=2, hessian_at=("preconditioned",))
    with pytest.raises(ValueError, match="preconditioner= is read only with"):
        quotient_trajectory(optax.adam(0.01), _group(), hessian_every=2, preconditioner=adam_preconditioner())
    with pytest.raises(ValueError, match="hessian_at: unknown"):
        quotient_trajectory(optax.adam(0.01), _group(), hessian_every=2, hessian_at=("precond",))
    with pytest.raises(ValueError, match=r"b2=1.0 is not allowed; need a number in \[0, 1\)"):
        adam_preconditioner(b2=1.0)
    with pytest.raises(ValueError, match="eps=-1.0 is not allowed"):
        adam_preconditioner(eps=-1.0)
    with pytest.raises(ValueError, match="holds no optax.ScaleByAdamState"):
        adam_preconditioner()(optax.sgd(0.1, momentum=0.9).init(p0))
    two = optax.chain(optax.adam(0.1), optax.adam(0.1)).init(p0)
    with pytest.raises(ValueError, match="holds 2 optax.ScaleByAdamState"):
        adam_preconditioner()(two)
    mask = {"l0": {"kernel": True, "bias": False}, "l1": {"kernel": True, "bias": True}}
    with pytest.raises(ValueError, match="covers only part of the parameters"):
        adam_preconditioner()(optax.masked(optax.adam(0.1), mask).init(p0))
    full = optax.masked(optax.adam(0.1), jax.tree.map(lambda _: True, p0)).init(p0)
    assert jax.tree.structure(adam_preconditioner()(_bump(full))) == jax.tree.structure(p0)  # a full mask


def _bump(state):
    """``state`` after one step's worth of count (a zero count has no bias correction)."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    return jax.tree.map(lambda x: x._replace(count=x.count + 1) if is_adam(x) else x, state, is_leaf=is_adam)


# ---- detection --------------------------------------------------------------------------------------------------


def _synthetic(peak, lr=0.01, n=60, every=5, start=100):
    """``eta * sharpness_preconditioned`` rising linearly from 0 to ``peak`` then falling back over steps
    ``start .. start + n - 1`` (past Adam's bias-correction steps, which the detector leaves out), refreshed every
    ``every`` steps and held in between (``hessian_step`` marks the refreshes)."""
    steps = np.arange(start, start + n)
    refresh = steps - steps % every
    shape = np.interp(refresh - start, [0, n // 2, n - 1], [0.0, peak, 0.0])
    return {"step": steps, "loss": np.linspace(1.0, 0.5, n), "sharpness_preconditioned": shape / lr,
            "hessian_step": refresh.astype(np.int32), "lr": np.full(n, lr)}


def _expected(traj, level, lr, rearm=0.9):
    """The first refreshes at which ``eta lambda`` reaches ``level`` after being below ``rearm * level``."""
    q = lr * traj["sharpness_preconditioned"]
    fresh = np.r_[True, np.diff(traj["hessian_step"]) != 0]
    out, armed = [], True
    for i in np.nonzero(fresh)[0]:
        if armed and q[i] >= level:
            out.append(int(traj["step"][i]))
            armed = False
        elif not armed and q[i] < rearm * level:
            armed = True
    return out


@pytest.mark.parametrize("b1", [0.9, 0.5])
def test_detect_preconditioned_edge_of_stability(b1):
    edge = adam_edge(b1)
    traj = _synthetic(1.3 * edge)
    ev = detect(traj, kinds=["edge_of_stability"], adaptive=True, b1=b1)
    want = sorted([(s, edge / 2) for s in _expected(traj, edge / 2, 0.01)] +
                  [(s, edge) for s in _expected(traj, edge, 0.01)])
    assert len(want) == 2  # one crossing of each level, at different refreshes
    assert sorted((e.step, e.details["level"]) for e in ev) == want
    assert {e.variant for e in ev} == {"preconditioned"} and not any(e.invariant for e in ev)
    assert all(e.details["edge"] == edge and e.details["b1"] == b1 for e in ev)
    # exactly at the level counts, and the strength is eta * lambda there
    (top,) = [e for e in ev if e.details["level"] == edge]
    assert top.strength >= edge and top.observables["lr"] == 0.01

    below = _synthetic(0.95 * edge)  # reaches level 1 (edge / 2) only
    ev_below = detect(below, kinds=["edge_of_stability"], adaptive=True, b1=b1)
    assert [e.details["level"] for e in ev_below] == [edge / 2]
    # without adaptive=True (an SGD run) the key is not read; adaptive without the key: no events
    assert detect(traj, kinds=["edge_of_stability"]) == []
    assert detect({k: v for k, v in traj.items() if k != "sharpness_preconditioned"},
                  kinds=["edge_of_stability"], adaptive=True, b1=b1) == []
    assert detect_edge_of_stability(traj, steps=traj["step"], lr=traj["lr"], adaptive=True, b1=b1) == ev


@pytest.mark.parametrize("b1", [0.9, 0.5, 0.0])
def test_adam_bias_correction_steps_are_not_read(b1):
    """While ``b1^t`` is not small, ``P`` carries Adam's bias correction ``1 - b1^t``: the preconditioned sharpness
    of a constant curvature reads ``lambda / (1 - b1^t)``, up to ``1 / (1 - b1)`` times its settled value (what
    made every Adam run cross the edge at step 0).  Those steps (``b1^(k+1) > 0.05``) give no event; a crossing
    after them does, at its step."""
    edge, n = adam_edge(b1), 80
    steps = np.arange(n)
    settled = 0.8 * edge / 0.01  # eta * lambda = 0.8 edge once settled: above level 1 (edge / 2), below the edge
    lam = settled / (1 - b1 ** (steps + 1.0))
    first = int(np.ceil(np.log(0.05) / np.log(b1))) - 1 if b1 > 0 else 0  # the first row read: b1^(k+1) <= 0.05
    assert b1 ** (first + 1) <= 0.05 < (b1 ** first if first > 0 else 1.0)
    traj = {"step": steps, "loss": np.ones(n), "sharpness_preconditioned": lam, "hessian_step": steps,
            "lr": np.full(n, 0.01)}
    ev = detect(traj, kinds=["edge_of_stability"], adaptive=True, b1=b1)
    assert [(e.step, e.details["level"]) for e in ev] == [(first, edge / 2)], [(e.step, e.details) for e in ev]
    assert 0.01 * lam[0] >= edge or b1 == 0  # the bias-corrected steps did cross the edge (b1 = 0: none exist)


def test_detect_stays_silent_below_the_edge():
    traj = _synthetic(0.45 * adam_edge(0.9))
    assert detect(traj, kinds=["edge_of_stability"], adaptive=True, b1=0.9) == []


def test_b1_option_is_validated_and_taken_from_the_config():
    traj = _synthetic(40.0)
    for bad in (1.0, -0.5, "0.9", None):
        with pytest.raises(ValueError, match=r"b1=.* is not allowed; need a number in \[0, 1\)"):
            detect(traj, adaptive=True, b1=bad)
    with pytest.raises(ValueError, match=r"LiveDetector: b1=1.2"):
        LiveDetector(adaptive=True, b1=1.2)
    opts = _options_from_config({"optim": {"name": "adamw", "b1": 0.8, "lr": 0.01}})
    assert opts["adaptive"] is True and opts["b1"] == 0.8
    assert "b1" not in _options_from_config({"optim": {"name": "sgd", "b1": 0.8}})
    live = LiveDetector(kinds=["edge_of_stability"], lr=0.01, **opts)
    got = live.update({k: v[:30] for k, v in traj.items()}) + live.update({k: v[30:] for k, v in traj.items()})
    whole = detect(traj, kinds=["edge_of_stability"], adaptive=True, b1=0.8)
    assert [e.key() for e in got] == [e.key() for e in whole] and len(got) == 2  # (live peaks: as of the chunk)
    assert {e.details["edge"] for e in got} == {adam_edge(0.8)}


# ---- the phenomenon -----------------------------------------------------------------------------------------------


def _regression(steps, lr, hessian_every=10):
    """Full-batch Adam (``b1 = 0.9``) on a 4-16-1 tanh MLP fitting ``sin(x . w)`` (64 points, float64)."""
    kx, kp, kw = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (64, 4), jnp.float64)
    y = jnp.sin(x @ jax.random.normal(kw, (4, 1), jnp.float64))
    k1, k2 = jax.random.split(kp)
    p0 = {"l0": {"kernel": jax.random.normal(k1, (4, 16), jnp.float64) / 2, "bias": jnp.zeros(16, jnp.float64)},
          "l1": {"kernel": jax.random.normal(k2, (16, 1), jnp.float64) / 4, "bias": jnp.zeros(1, jnp.float64)}}
    tx = quotient_trajectory(optax.adam(lr), _group(), observables=("loss",), hessian_every=hessian_every,
                             hessian_at=("raw", "preconditioned"), preconditioner=adam_preconditioner(),
                             lanczos_steps=20)
    traj = train(_loss, p0, tx, lambda step, key: (x, y), num_steps=steps)[2]
    fresh = np.r_[True, np.diff(np.asarray(traj["hessian_step"])) != 0]
    pre = lr * np.asarray(traj["sharpness_preconditioned"])[fresh] / adam_edge(0.9)
    raw = lr * np.asarray(traj["sharpness_raw"])[fresh]
    return pre, raw, traj


@pytest.mark.slow
def test_adam_preconditioned_sharpness_hovers_at_the_edge(adam_x64):
    """1200 full-batch Adam steps at ``eta = 0.03``: ``eta lambda_max(P^-1 H)`` rises to ``adam_edge(0.9) = 38``
    by step 90 (while the loss falls, ``v`` shrinks and ``P^-1`` grows) and then hovers there (measured 0.875-1.041
    times the edge over the last third, dropping back after each overshoot), while ``eta lambda_max(H)`` stays
    below 0.24, far below any level of gradient descent or of Adam."""
    pre, raw, traj = _regression(1200, 0.03)
    assert pre[1:6].max() < 0.6  # well below the edge after the first step (whose P has seen one gradient)
    last = pre[2 * len(pre) // 3:]
    assert 0.7 < last.min() and last.max() < 1.3, (last.min(), last.max())
    assert raw.max() < 0.5
    ev = detect(traj, kinds=["edge_of_stability"], lr=0.03, adaptive=True, b1=0.9)
    assert any(e.details["level"] == adam_edge(0.9) for e in ev)


def test_adam_preconditioned_sharpness_reaches_the_edge_fast(adam_x64):
    """The fast variant: 150 steps rise from well below the edge to it (measured: 0.16-0.45 times it at steps
    10-50, 1.09 at step 90) and stay near it after the first crossing (0.84-1.01), with ``eta lambda_max(H)``
    below 0.5."""
    pre, raw, _ = _regression(150, 0.03)
    assert pre[1:6].max() < 0.6
    first = int(np.argmax(pre[1:] >= 1.0)) + 1
    assert pre[first] >= 1.0 and first < len(pre) - 3, pre
    assert 0.7 < pre[first:].min() and pre[first:].max() < 1.3, pre
    assert raw.max() < 0.5


# ---- the runner ---------------------------------------------------------------------------------------------------


def _adamw_settings(**over):
    return tiny_settings(10, **{"optim.name": "adamw", "optim.lr": 0.01, "optim.momentum": 0.0, "optim.b1": 0.8,
                                "optim.b2": 0.99, "optim.eps": 1e-6, "observables.hessian_every": 5,
                                "observables.lanczos_steps": 6, **over})


def test_runner_optimizer_records_the_preconditioned_sharpness_of_adamw(monkeypatch):
    """The runner's optimiser for an AdamW config with ``observables.hessian_every`` records
    ``sharpness_preconditioned`` with the config's ``b1, b2, eps``; an SGD config or one without the Hessian does
    not (the state's shapes only: nothing is compiled)."""
    from quotient_sgd import optim
    from quotient_sgd.runner._build import build, init_params, make_optimizer

    seen = []
    real = optim.adam_preconditioner
    monkeypatch.setattr(optim, "adam_preconditioner", lambda *a, **k: seen.append((a, k)) or real(*a, **k))

    def keys(s):
        b = build(s)
        p = jax.eval_shape(lambda: init_params(b, 0, None))
        return set(jax.eval_shape(make_optimizer(s, b.group).init, p).observables)

    assert {"sharpness_preconditioned", "lambda_min_preconditioned", "sharpness_raw"} <= keys(_adamw_settings())
    assert seen and all(x == ((0.8, 0.99, 1e-6), {}) for x in seen)
    assert "sharpness_preconditioned" not in keys(_adamw_settings(**{"observables.hessian_every": 0}))
    sgd = tiny_settings(10, **{"observables.hessian_every": 5, "observables.lanczos_steps": 6})
    assert "sharpness_raw" in keys(sgd) and "sharpness_preconditioned" not in keys(sgd)


@pytest.mark.slow
def test_runner_records_the_preconditioned_sharpness_of_adamw(tmp_path):
    """An AdamW run with ``observables.hessian_every`` writes Adam's preconditioned sharpness (and the other
    Hessian keys) into ``trajectory.npz``; its Hessian plot draws it."""
    from quotient_sgd.runner import run
    from quotient_sgd.runner._report import make_plots

    wd = str(tmp_path / "r")
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction (see adam_x64)
        run(_adamw_settings(), wd)
    traj = load_trajectory(wd)
    for key in ("sharpness_preconditioned", "lambda_min_preconditioned", "sharpness_raw"):
        assert key in traj and np.isfinite(traj[key]).all(), key
    assert list(np.unique(traj["hessian_step"])) == [0, 5]
    paths = make_plots(wd, traj, [], [])
    assert any(p.endswith("hessian.png") for p in paths)
