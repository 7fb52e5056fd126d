"""Adam's edge of stability with AdamW's decoupled weight decay and with Nesterov Adam:
``adam_edge(b1, decay=eta * wd, nesterov=...)`` against the linear map of optax's own update with the second
moment held, its detection with a learning rate per step, and the runner's AdamW events."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import tiny_settings
from quotient_sgd.diagnostics import LiveDetector, adam_edge, detect
from quotient_sgd.diagnostics._live import _options_from_config

# ---- the threshold against optax -------------------------------------------------------------------------------

_COUNT = 10**6  # b1^t and b2^t underflow to 0 in float64: bias corrections exactly 1


@pytest.fixture
def adam_x64(x64):
    """float64 with standard promotion (optax's bias correction mixes a Python float and int32)."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def _optax_map(hess, nu, eta, wd, b1, b2, eps, nesterov):
    """The Jacobian of one ``optax.adamw(eta, b1, b2, eps, weight_decay=wd, nesterov=nesterov)`` step on
    ``L = theta^T H theta / 2`` with respect to ``(theta, mu)`` at the minimum ``(0, 0)``, the state holding
    ``nu`` and count ``_COUNT``.  There the gradient is 0, so ``nu`` gets no ``g^2`` and its derivative meets a zero
    first moment: the map is exactly the step with the preconditioner frozen."""
    n = len(nu)
    tx = optax.adamw(eta, b1=b1, b2=b2, eps=eps, weight_decay=wd, nesterov=nesterov)
    rest = tx.init(jnp.zeros(n))[1:]
    hess = jnp.asarray(hess)

    def step(x):
        theta, mu = x[:n], x[n:]
        state = (optax.ScaleByAdamState(count=jnp.asarray(_COUNT, jnp.int32), mu=mu, nu=jnp.asarray(nu)),) + rest
        upd, new = tx.update(hess @ theta, state, theta)
        return jnp.concatenate([theta + upd, new[0].mu])

    return np.asarray(jax.jacfwd(step)(jnp.zeros(2 * n)))


def _radius(m):
    return float(np.max(np.abs(np.linalg.eigvals(m))))


@pytest.mark.parametrize("nesterov", [False, True])
# (b1 = 0, 0.5 and 0.99 in the slow suite)
@pytest.mark.parametrize("b1", [pytest.param(0.0, marks=pytest.mark.slow), pytest.param(0.5, marks=pytest.mark.slow),
                                0.9, pytest.param(0.99, marks=pytest.mark.slow)])
def test_adam_edge_is_where_optax_adamw_with_frozen_nu_turns_unstable(adam_x64, b1, nesterov):
    """For a non-diagonal ``H`` and a random ``nu``, ``eta lambda_max(P^-1 H)`` just below
    ``adam_edge(b1, decay=eta wd, nesterov)`` gives a spectral radius < 1 of the optax step's linear map, just
    above it > 1; and the map is stable on the whole interval below the edge (no complex pair or ``+1`` root
    leaves first) and unstable above it up to 3 times the edge (``P = sqrt(b2 nu) + eps`` by hand: the ``nu``
    that step divides by)."""
    rng = np.random.default_rng(int(1000 * b1) + nesterov)
    b2, eps, eta = 0.999, 1e-8, 0.1
    q = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    h_unit = q @ np.diag(rng.uniform(0.2, 1.0, 3)) @ q.T
    nu = rng.uniform(0.01, 2.0, 3)
    p = np.sqrt(b2 * nu) + eps
    lam = np.max(np.linalg.eigvalsh(h_unit / np.sqrt(p)[:, None] / np.sqrt(p)[None, :]))  # lambda_max(P^-1 H)
    for decay in (0.0, 0.01, 0.3):
        wd = decay / eta
        edge = adam_edge(b1, decay=decay, nesterov=nesterov)
        scale = edge / (eta * lam)  # H = scale * h_unit puts eta lambda_max(P^-1 H) at the edge
        for factor, stable in ((1 - 1e-3, True), (1 + 1e-3, False)):
            r = _radius(_optax_map(factor * scale * h_unit, nu, eta, wd, b1, b2, eps, nesterov))
            assert (r < 1) == stable, (decay, factor, r)
        # the map is affine in H at the minimum: scan the whole range from the maps at H = 0 and H = h_unit
        m0 = _optax_map(0 * h_unit, nu, eta, wd, b1, b2, eps, nesterov)
        m1 = _optax_map(h_unit, nu, eta, wd, b1, b2, eps, nesterov)
        np.testing.assert_allclose(m0 + 2 * (m1 - m0), _optax_map(2 * h_unit, nu, eta, wd, b1, b2, eps, nesterov),
                                   atol=1e-12)
        grid = np.linspace(1e-3, 3.0, 301)  # multiples of the edge
        radii = np.array([_radius(m0 + g * scale * (m1 - m0)) for g in grid])
        assert (radii[grid < 1 - 1e-3] < 1).all() and (radii[grid > 1 + 1e-3] > 1).all(), (decay, radii)
    # the plain edge is the old one; the decay and Nesterov lower it
    assert adam_edge(b1, decay=0.0, nesterov=False) == adam_edge(b1)
    assert adam_edge(0.9, decay=0.3) == pytest.approx(1.7 * 19) and adam_edge(0.9, nesterov=True) == pytest.approx(
        38 / 2.8)


@pytest.mark.parametrize("bad", [-0.1, 2.0, 3.0, float("nan"), float("inf"), True, "0.1", None])
def test_adam_edge_rejects_decay_outside_0_2(bad):
    with pytest.raises(ValueError, match=r"adam_edge: decay=.* is not allowed; need a number in \[0, 2\)"):
        adam_edge(0.9, decay=bad)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_adam_edge_rejects_nesterov_not_bool(bad):
    with pytest.raises(ValueError, match=r"adam_edge: nesterov=.* is not allowed; need True or False"):
        adam_edge(0.9, nesterov=bad)


# ---- detection ----------------------------------------------------------------------------------------------------


def _rising(q_end, lr, n=60, start=100):
    """``eta * sharpness_preconditioned`` rising linearly from 0 to ``q_end`` over steps ``start ..``, refreshed
    every step, with the learning rate ``lr`` (number or one per step)."""
    steps = np.arange(start, start + n)
    lr = np.broadcast_to(np.asarray(lr, np.float64), (n,)).copy()
    q = np.linspace(0.0, q_end, n)
    return {"step": steps, "loss": np.linspace(1.0, 0.5, n), "sharpness_preconditioned": q / lr,
            "hessian_step": steps.astype(np.int32), "lr": lr}


def _first_at_or_above(traj, edge):
    q = traj["lr"] * traj["sharpness_preconditioned"]
    assert (q >= edge).any()
    return int(traj["step"][np.argmax(q >= edge)])


def _level2(events):
    return [e for e in events if e.details["level"] == e.details["edge"]]


def test_adamw_edge_is_detected_below_the_plain_edge():
    """A preconditioned sharpness that ends between the AdamW edge (``eta wd = 0.3``) and Adam's: with
    ``weight_decay`` the edge event comes at the first step at or above the AdamW edge; without it, none (the
    plain edge is not reached)."""
    b1, lr, wd = 0.9, 0.01, 30.0
    lower, plain = adam_edge(b1, decay=lr * wd), adam_edge(b1)
    traj = _rising(0.5 * (lower + plain), lr)
    ev = _level2(detect(traj, kinds=["edge_of_stability"], adaptive=True, b1=b1, weight_decay=wd))
    assert [e.step for e in ev] == [_first_at_or_above(traj, lower)]
    (e,) = ev
    assert e.details["edge"] == lower and e.details["decay"] == lr * wd and e.details["nesterov"] is False
    assert e.strength >= lower and e.variant == "preconditioned"
    assert _level2(detect(traj, kinds=["edge_of_stability"], adaptive=True, b1=b1)) == []
    # level 1 moves with the edge as well
    (half,) = [e for e in detect(traj, kinds=["edge_of_stability"], adaptive=True, b1=b1, weight_decay=wd)
               if e.details["level"] == lower / 2]
    assert half.step == _first_at_or_above(traj, lower / 2)


def test_nesterov_adam_edge_is_detected_below_the_plain_edge():
    b1, lr = 0.9, 0.01
    lower, plain = adam_edge(b1, nesterov=True), adam_edge(b1)
    traj = _rising(0.5 * (lower + plain), lr)
    ev = _level2(detect(traj, kinds=["edge_of_stability"], adaptive=True, b1=b1, nesterov=True))
    assert [e.step for e in ev] == [_first_at_or_above(traj, lower)]
    assert ev[0].details["edge"] == lower and ev[0].details["nesterov"] is True
    assert _level2(detect(traj, kinds=["edge_of_stability"], adaptive=True, b1=b1)) == []
    # both together: the edge of Nesterov AdamW
    both = adam_edge(b1, decay=0.2, nesterov=True)
    ev = _level2(detect(traj, kinds=["edge_of_stability"], adaptive=True, b1=b1, nesterov=True, weight_decay=20.0))
    assert [(e.step, e.details["edge"]) for e in ev] == [(_first_at_or_above(traj, both), both)]


def test_adamw_edge_follows_a_learning_rate_schedule():
    """With the learning rate given per step (a rising schedule), the AdamW edge of each step is the one of its
    own ``eta wd``: the event is at the first step with ``eta_k lambda_k >= adam_edge(b1, decay=eta_k wd)``, not
    where the edge of the first learning rate (never reached) or of the last one (reached earlier) puts it."""
    b1, wd, n = 0.9, 40.0, 60
    lr = np.linspace(0.005, 0.04, n)  # eta wd from 0.2 up to 1.6: the edge falls from 34.2 to 7.6
    traj = _rising(20.0, lr, n=n)
    q = lr * traj["sharpness_preconditioned"]
    edges = np.array([adam_edge(b1, decay=float(d)) for d in lr * wd])
    assert (q >= edges).any() and not (q >= edges[0]).any()
    want = int(traj["step"][np.argmax(q >= edges)])
    assert want > _first_at_or_above(traj, edges[-1])
    ev = _level2(detect(traj, kinds=["edge_of_stability"], adaptive=True, b1=b1, weight_decay=wd))
    i = want - 100
    assert [(e.step, e.details["edge"], e.details["decay"]) for e in ev] == [(want, edges[i], lr[i] * wd)]
    assert ev[0].observables["lr"] == lr[i]
    live = LiveDetector(kinds=["edge_of_stability"], adaptive=True, b1=b1, weight_decay=wd)
    got = live.update({k: v[:30] for k, v in traj.items()}) + live.update({k: v[30:] for k, v in traj.items()})
    whole = detect(traj, kinds=["edge_of_stability"], adaptive=True, b1=b1, weight_decay=wd)
    assert [e.key() for e in got] == [e.key() for e in whole]


def test_weight_decay_option_is_validated():
    traj = _rising(30.0, 0.01)
    for bad in (-1.0, float("inf"), "0.1", None):
        with pytest.raises(ValueError, match=r"weight_decay=.* is not allowed; need a finite number >= 0"):
            detect(traj, adaptive=True, weight_decay=bad)
    with pytest.raises(ValueError, match=r"lr \* weight_decay = 2\.0.* at step 100 .*need < 2"):
        detect(traj, kinds=["edge_of_stability"], adaptive=True, weight_decay=200.0)
    # read only with adaptive=True
    assert detect(traj, kinds=["edge_of_stability"], weight_decay=200.0) == []


# ---- the runner ---------------------------------------------------------------------------------------------------


def test_runner_detects_adamw_runs_at_the_adamw_edge():
    """The runner's events of an AdamW config (``detect_events``, what it writes to ``events.json``; and
    ``detect_run``'s options from ``config.json``) use the edge with the config's ``lr * weight_decay``, recorded
    in the event's details; an Adam config has no decay."""
    from quotient_sgd.runner._report import detect_events

    over = {"optim.name": "adamw", "optim.lr": 0.01, "optim.momentum": 0.0, "optim.b1": 0.8, "optim.b2": 0.99,
            "optim.weight_decay": 20.0}
    s = tiny_settings(10, **over)
    opts = _options_from_config(s.to_dict())
    assert opts["adaptive"] is True and opts["b1"] == 0.8 and opts["weight_decay"] == 20.0
    lower, plain = adam_edge(0.8, decay=0.2), adam_edge(0.8)
    traj = _rising(0.5 * (lower + plain), 0.01)
    traj.pop("lr")  # the runner passes the config's lr
    events, err = detect_events(s, traj, None)
    assert err is None
    top = [e for e in events if e["kind"] == "edge_of_stability" and e["details"]["level"] == e["details"]["edge"]]
    assert [(e["step"], e["details"]["edge"], e["details"]["decay"]) for e in top] == [
        (_first_at_or_above({**traj, "lr": np.full(60, 0.01)}, lower), lower, pytest.approx(0.2))]
    adam = tiny_settings(10, **{**over, "optim.name": "adam", "optim.weight_decay": 0.0})
    assert "weight_decay" not in _options_from_config(adam.to_dict())
    events, err = detect_events(adam, traj, None)
    assert err is None and not [e for e in events if e["kind"] == "edge_of_stability"
                                and e["details"]["level"] == e["details"]["edge"]]
