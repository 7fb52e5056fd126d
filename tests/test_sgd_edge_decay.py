"""SGD's edge of stability and fold with coupled weight decay: ``stability_edge`` / ``fold_edge`` /
``fold_levels_for(..., decay=eta * wd)`` against the linear map of optax's own step
(``optax.chain(optax.add_decayed_weights(wd), optax.sgd(eta, momentum, nesterov))``), their detection with a
learning rate per step, and the runner's events of an SGD config with weight decay."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import tiny_settings
from quotient_sgd.diagnostics import (ALL_KINDS, LiveDetector, detect, detect_run, fold_edge, fold_levels_for,
                                      stability_edge)
from quotient_sgd.diagnostics._live import _options_from_config

# ---- the thresholds against optax ------------------------------------------------------------------------------


def _optax_map(hess, eta, wd, beta, nesterov):
    """The Jacobian of one ``optax.chain(optax.add_decayed_weights(wd), optax.sgd(eta, momentum=beta,
    nesterov=nesterov))`` step on ``L = theta^T H theta / 2`` (the decay is not in the loss) with respect to
    ``(theta, trace)`` at ``(0, 0)``: the step's linear map (it is linear in ``(theta, trace)``)."""
    n = hess.shape[0]
    tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(eta, momentum=beta, nesterov=nesterov))
    decay_state, (_, *rest) = tx.init(jnp.zeros(n))
    hess = jnp.asarray(hess)

    def step(x):
        theta, trace = x[:n], x[n:]
        state = (decay_state, (optax.TraceState(trace=trace), *rest))
        upd, new = tx.update(hess @ theta, state, theta)
        return jnp.concatenate([theta + upd, new[1][0].trace])

    return np.asarray(jax.jacfwd(step)(jnp.zeros(2 * n)))


def _radius(m):
    return float(np.max(np.abs(np.linalg.eigvals(m))))


def _min_real(m):
    return float(np.min(np.linalg.eigvals(m).real))


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_decayed_edge_and_fold_are_those_of_optax_sgd_with_coupled_decay(x64, beta, nesterov):
    """For a non-diagonal loss Hessian ``H`` and ``eta wd`` in {0, 0.01, 0.3}: ``eta lambda_max(H)`` just below
    ``stability_edge(beta, nesterov, decay=eta wd)`` gives a spectral radius < 1 of optax's step map, just above
    it > 1; just below ``fold_edge(..., decay=eta wd)`` every eigenvalue has real part >= 0, just above one is in
    the left half-plane (the fold's defining property).  The map is affine in ``H``: over the whole range up to 3
    times the edge it is stable exactly below the edge and unfolded exactly below the fold.  The decayed values
    are the plain ones less ``eta wd``, and ``fold_levels_for`` maps 1 and 2 onto them."""
    rng = np.random.default_rng(int(10 * beta) + 100 * nesterov)
    eta = 0.1
    q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    h_unit = q @ np.diag([1.0, *rng.uniform(0.1, 0.9, 2)]) @ q.T  # lambda_max(h_unit) = 1
    for decay in (0.0, 0.01, 0.3):
        wd = decay / eta
        edge, fold = stability_edge(beta, nesterov, decay=decay), fold_edge(beta, nesterov, decay=decay)
        assert edge == pytest.approx(stability_edge(beta, nesterov) - decay, abs=1e-15)
        assert fold == pytest.approx(fold_edge(beta, nesterov) - decay, abs=1e-15)
        assert fold_levels_for((1.0, 2.0), beta, nesterov, decay=decay) == [fold, edge]
        for factor, below in ((1 - 1e-3, True), (1 + 1e-3, False)):
            r = _radius(_optax_map(factor * edge / eta * h_unit, eta, wd, beta, nesterov))
            assert (r < 1) == below, (decay, factor, r)
            # (without momentum the trace is a copy of the gradient: an eigenvalue exactly 0)
            re = _min_real(_optax_map(factor * fold / eta * h_unit, eta, wd, beta, nesterov))
            assert (re >= -1e-12) == below and (below or re < -1e-5), (decay, factor, re)
        m0 = _optax_map(0 * h_unit, eta, wd, beta, nesterov)
        m1 = _optax_map(h_unit / eta, eta, wd, beta, nesterov)  # eta lambda_max = 1
        np.testing.assert_allclose(m0 + 2 * (m1 - m0), _optax_map(2 * h_unit / eta, eta, wd, beta, nesterov),
                                   atol=1e-12)
        grid = np.linspace(1e-3, 3.0, 301) * edge  # eta lambda_max
        maps = [m0 + x * (m1 - m0) for x in grid]
        radii, reals = np.array([_radius(m) for m in maps]), np.array([_min_real(m) for m in maps])
        assert (radii[grid < edge * (1 - 1e-3)] < 1).all() and (radii[grid > edge * (1 + 1e-3)] > 1).all()
        assert (reals[grid < fold * (1 - 1e-3)] >= -1e-12).all() and (reals[grid > fold * (1 + 1e-3)] < 0).all()
        if decay:  # the undecayed edge is past the decayed one
            assert _radius(m0 + stability_edge(beta, nesterov) * (m1 - m0)) > 1


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_decay_at_or_past_the_plain_edge_is_refused(x64, beta, nesterov):
    """``decay`` is allowed in ``[0, plain edge)`` (``[0, plain fold)`` for the fold): at zero loss curvature the
    decay alone is stable / unfolded just below that bound and unstable / folded just above it (optax's map at
    ``H = 0``), and outside the range the functions refuse it, naming the argument and the range."""
    eta, zero = 0.1, np.zeros((3, 3))
    e0, f0 = stability_edge(beta, nesterov), fold_edge(beta, nesterov)
    assert _radius(_optax_map(zero, eta, 0.999 * e0 / eta, beta, nesterov)) < 1
    assert _radius(_optax_map(zero, eta, 1.001 * e0 / eta, beta, nesterov)) > 1
    assert _min_real(_optax_map(zero, eta, 0.999 * f0 / eta, beta, nesterov)) >= -1e-12
    assert _min_real(_optax_map(zero, eta, 1.001 * f0 / eta, beta, nesterov)) < 0
    for bad in (-0.1, e0, e0 + 1, float("nan"), float("inf"), True, "0.1", None):
        with pytest.raises(ValueError, match=r"stability_edge: decay=.* is not allowed; need a number in \[0, "):
            stability_edge(beta, nesterov, decay=bad)
    for bad in (-0.1, f0, 0.5 * (f0 + e0), float("nan"), True, None):
        with pytest.raises(ValueError, match=r"fold_edge: decay=.* is not allowed; need a number in \[0, "):
            fold_edge(beta, nesterov, decay=bad)
        with pytest.raises(ValueError, match=r"fold_edge: decay="):
            fold_levels_for((1.0, 2.0), beta, nesterov, decay=bad)
    # between the plain fold and the plain edge there is an edge but no fold
    assert stability_edge(beta, nesterov, decay=0.5 * (f0 + e0)) == pytest.approx(0.5 * (e0 - f0))


# ---- detection ----------------------------------------------------------------------------------------------------


def _rising(q_end, lr, n=60, start=100, key="sharpness_horizontal"):
    """``eta * key`` rising linearly from 0 to ``q_end`` over steps ``start ..``, refreshed every step, with the
    learning rate ``lr`` (number or one per step)."""
    steps = np.arange(start, start + n)
    lr = np.broadcast_to(np.asarray(lr, np.float64), (n,)).copy()
    traj = {"step": steps, "loss": np.linspace(1.0, 0.5, n), "lr": lr}
    if key == "fold_number":  # already eta * kappa
        traj[key] = np.linspace(0.0, q_end, n)
    else:
        traj[key] = np.linspace(0.0, q_end, n) / lr
        traj["hessian_step"] = steps.astype(np.int32)
    return traj


def _first_at_or_above(q, steps, level):
    level = np.broadcast_to(level, q.shape)
    assert (q >= level).any()
    return int(steps[np.argmax(q >= level)])


def _top(events):
    return [e for e in events if e.details["level"] == e.details.get("edge", 2.0)]


@pytest.mark.parametrize("beta,nesterov", [(0.0, False), (0.9, False), (0.5, True)])
def test_sgd_edge_with_weight_decay_is_detected_below_the_plain_edge(beta, nesterov):
    """``eta lambda_max`` ending between the decayed edge (``eta wd = 0.3``) and the plain one: with
    ``weight_decay`` the level-2 event comes at the first step at or above the decayed edge, recording ``edge``
    and ``decay``; without it, none.  Level 1 moves with the edge.  The live detector agrees chunk by chunk."""
    lr, wd = 0.1, 3.0
    lower, plain = stability_edge(beta, nesterov, decay=0.3), stability_edge(beta, nesterov)
    traj = _rising(0.5 * (lower + plain), lr)
    q = lr * traj["sharpness_horizontal"]
    opts = dict(kinds=["edge_of_stability"], momentum=beta, nesterov=nesterov)
    ev = _top(detect(traj, weight_decay=wd, **opts))
    assert [(e.step, e.variant) for e in ev] == [(_first_at_or_above(q, traj["step"], lower), "step")]
    assert ev[0].details["edge"] == lower and ev[0].details["decay"] == pytest.approx(0.3) and ev[0].strength >= lower
    assert _top(detect(traj, **opts)) == []
    (half,) = [e for e in detect(traj, weight_decay=wd, **opts) if e.details["level"] == lower / 2]
    assert half.step == _first_at_or_above(q, traj["step"], lower / 2)
    live = LiveDetector(weight_decay=wd, **opts)
    got = live.update({k: v[:25] for k, v in traj.items()}) + live.update({k: v[25:] for k, v in traj.items()})
    assert [e.key() for e in got] == [e.key() for e in detect(traj, weight_decay=wd, **opts)]


def test_sgd_edge_with_weight_decay_follows_a_learning_rate_schedule():
    """With the learning rate per step, each step's edge is ``stability_edge(beta, decay=eta_k wd)``: the event is
    at the first step with ``eta_k lambda_k >=`` it, neither where the first step's edge (never reached) nor where
    the last step's (reached earlier) puts it."""
    beta, wd, n = 0.9, 10.0, 60
    lr = np.linspace(0.01, 0.12, n)  # eta wd from 0.1 to 1.2: the edge falls from 3.7 to 2.6
    traj = _rising(3.3, lr, n=n)
    q = lr * traj["sharpness_horizontal"]
    edges = np.array([stability_edge(beta, decay=float(d)) for d in lr * wd])
    assert not (q >= edges[0]).any()
    want = _first_at_or_above(q, traj["step"], edges)
    assert want > _first_at_or_above(q, traj["step"], edges[-1])
    ev = _top(detect(traj, kinds=["edge_of_stability"], momentum=beta, weight_decay=wd))
    i = want - 100
    assert [(e.step, e.details["edge"], e.details["decay"], e.observables["lr"]) for e in ev] == [
        (want, edges[i], lr[i] * wd, lr[i])]


def test_fold_levels_with_weight_decay():
    """A fold number ending between the decayed and the plain fold of heavy ball (``beta = 0.5``, ``eta wd =
    0.2``): level 1 only with ``weight_decay``, at the first step at or above ``fold_edge(0.5) - 0.2``, with
    ``decay``, ``fold_edge`` and ``edge`` in the details; ``adaptive=True`` (AdamW, decoupled) ignores it, and an
    adaptive run keeps gradient descent's levels whatever ``momentum`` (SGD's) is given: level 1 at 1."""
    beta, lr, wd = 0.5, 0.1, 2.0
    lower, plain = fold_edge(beta, decay=0.2), fold_edge(beta)
    traj = _rising(0.5 * (lower + plain), lr, key="fold_number")
    ev = detect(traj, kinds=["fold"], momentum=beta, weight_decay=wd)
    assert [(e.step, e.details["gd_level"]) for e in ev] == [
        (_first_at_or_above(traj["fold_number"], traj["step"], lower), 1.0)]
    d = ev[0].details
    assert (d["level"], d["fold_edge"], d["edge"]) == (lower, lower, stability_edge(beta, decay=0.2))
    assert d["decay"] == pytest.approx(0.2)
    assert detect(traj, kinds=["fold"], momentum=beta) == []
    adaptive = detect(traj, kinds=["fold"], momentum=beta, weight_decay=wd, adaptive=True)
    assert adaptive == detect(traj, kinds=["fold"], adaptive=True)
    assert [(e.step, e.details["level"]) for e in adaptive] == [
        (_first_at_or_above(traj["fold_number"], traj["step"], 1.0), 1.0)]
    # without momentum too: gradient descent's fold 1 moves to 1 - eta wd
    traj = _rising(0.9, lr, key="fold_number")
    (e,) = detect(traj, kinds=["fold"], weight_decay=wd)
    assert e.details["level"] == pytest.approx(0.8) and e.step == _first_at_or_above(traj["fold_number"],
                                                                                       traj["step"], 0.8)


def test_sgd_weight_decay_past_the_edge_or_fold_is_refused():
    lr = 0.1
    traj = {**_rising(1.0, lr), "fold_number": np.linspace(0.0, 0.5, 60)}
    with pytest.raises(ValueError, match=r"lr \* weight_decay = 3\.8.* at step 100 \(lr=0\.1, weight_decay=38\.0\) "
                                         r"is not allowed; need < stability_edge\(momentum=0\.9, nesterov=False\)"):
        detect(traj, kinds=["edge_of_stability"], momentum=0.9, weight_decay=38.0)
    # between the plain fold and the plain edge: an edge, no fold
    assert detect(traj, kinds=["edge_of_stability"], momentum=0.9, weight_decay=25.0) != []
    with pytest.raises(ValueError, match=r"lr \* weight_decay = 2\.5 at step 100 .*need < fold_edge\(momentum=0\.9"):
        detect(traj, kinds=["fold"], momentum=0.9, weight_decay=25.0)
    no_lr = {k: v for k, v in traj.items() if k != "lr"}
    with pytest.raises(ValueError, match=r"weight_decay=1\.0 of an SGD run needs the learning rate"):
        detect(no_lr, kinds=["fold"], weight_decay=1.0)
    with pytest.raises(ValueError, match=r"weight_decay=-1\.0 is not allowed; need a finite number >= 0"):
        detect(traj, weight_decay=-1.0)


# ---- the runner ---------------------------------------------------------------------------------------------------


def test_runner_detects_sgd_runs_with_weight_decay_at_the_decayed_edge(tmp_path):
    """The runner's events of an SGD config with weight decay (``detect_events``, what it writes to
    ``events.json``) use the edges less the config's ``lr * weight_decay``, recorded in the details; ``detect_run``
    on a run directory with that ``config.json`` gives the same events; without weight decay no option is set."""
    from quotient_sgd.runner._report import detect_events

    over = {"optim.name": "sgd", "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 3.0}
    s = tiny_settings(60, **over)
    opts = _options_from_config(s.to_dict())
    assert opts["weight_decay"] == 3.0 and opts["momentum"] == 0.9
    lower, plain = stability_edge(0.9, decay=0.3), stability_edge(0.9)
    traj = _rising(0.5 * (lower + plain), 0.1)
    traj.pop("lr")  # the runner passes the config's lr
    f_lower, f_plain = fold_edge(0.9, decay=0.3), fold_edge(0.9)
    traj["fold_number"] = np.linspace(0.0, 0.5 * (f_lower + f_plain), 60)
    events, err = detect_events(s, traj, None)
    assert err is None
    top = [e for e in events if e["kind"] == "edge_of_stability" and e["details"]["level"] == e["details"]["edge"]]
    q = 0.1 * traj["sharpness_horizontal"]
    assert [(e["step"], e["details"]["edge"], e["details"]["decay"]) for e in top] == [
        (_first_at_or_above(q, traj["step"], lower), lower, pytest.approx(0.3))]
    folds = [(e["step"], e["details"]["level"]) for e in events if e["kind"] == "fold"]
    assert folds == [(_first_at_or_above(traj["fold_number"], traj["step"], f_lower), f_lower)]
    np.savez(tmp_path / "trajectory.npz", **traj)
    (tmp_path / "config.json").write_text(json.dumps(s.to_dict()))
    again = [e.to_dict() for e in detect_run(tmp_path, write=False)]
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(events))
    plain_sgd = tiny_settings(60, **{**over, "optim.weight_decay": 0.0})
    assert "weight_decay" not in _options_from_config(plain_sgd.to_dict())
    events, err = detect_events(plain_sgd, traj, None)
    assert err is None and not [e for e in events if e["kind"] == "edge_of_stability"
                                and e["details"]["level"] == e["details"]["edge"]]


def test_runner_keeps_the_other_detectors_events_when_one_refuses_the_config():
    """Nesterov SGD with ``lr * weight_decay`` past its fold (1) but below its edge (1.357): the fold detector
    refuses the run (every mode folds), the runner records that error and still writes the edge-of-stability and
    the other detectors' events (it used to write none: one error in ``detect`` lost them all)."""
    from quotient_sgd.runner._report import detect_events

    over = {"optim.name": "sgd", "optim.lr": 0.5, "optim.momentum": 0.9, "optim.nesterov": True,
            "optim.weight_decay": 2.4}
    s = tiny_settings(60, **over)
    decay = 0.5 * 2.4
    assert fold_edge(0.9, nesterov=True) < decay < stability_edge(0.9, nesterov=True)
    traj = _rising(1.0, 0.5)  # eta * sharpness reaches 1, past the decayed edge 1.357 - 1.2
    traj.pop("lr")
    traj["fold_number"] = np.linspace(0.0, 0.5, 60)
    traj["loss"][40:] = 3.0  # the loss jumps (a spike of the 20-step smoothed loss): another detector's event
    events, err = detect_events(s, traj, None)
    assert err is not None and err.startswith("fold: ValueError") and "weight_decay" in err
    kinds = {e["kind"] for e in events}
    assert "edge_of_stability" in kinds and len(kinds) > 1 and "fold" not in kinds
    eos = [e for e in events if e["kind"] == "edge_of_stability"]
    assert [e["details"]["edge"] for e in eos] == pytest.approx(
        [stability_edge(0.9, nesterov=True, decay=decay)] * len(eos))
    others = [k for k in ALL_KINDS if k != "fold"]
    alone = [e.to_dict() for e in detect(traj, lr=0.5, kinds=others, **_options_from_config(s.to_dict()))]
    assert sorted(json.dumps(e, sort_keys=True) for e in events) == sorted(json.dumps(e, sort_keys=True)
                                                                          for e in alone)
