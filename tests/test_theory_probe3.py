"""THEORY's formulas against independent float64 arithmetic, on cases the other tests do not use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from quotient_sgd import models, optim
from quotient_sgd import observables as qobs


def _mlp_step(lr):
    """A float32 8-16-3 ReLU classifier, its gradient on a fixed batch and the SGD update of size ``lr``."""
    model = models.MLP(8, (16,), 3, classifier=True, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    x = jax.random.normal(jax.random.key(0), (32, 8), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (32,), 0, 3)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).mean()

    return model.symmetries(), params, loss


def _exact_charges(params):
    """THEORY section 2's charges of the MLP in float64 NumPy, from the stored (float32) parameters: per hidden unit
    Q_j = (|w_in,j|^2 + b_in,j^2 - |w_out,j|^2) / 2, and the logits' linear charges S_i = sum_k W[i, k], S_b."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(params))
    w0, b0 = p["layers"][0]["kernel"], p["layers"][0]["bias"]
    w1, b1 = p["layers"][1]["kernel"], p["layers"][1]["bias"]
    q = 0.5 * (np.sum(w0**2, axis=0) + b0**2 - np.sum(w1**2, axis=1))
    return q, np.sum(w1, axis=1), np.sum(b1)


def test_float32_charge_drift_is_the_exact_change_of_the_stored_charges():
    """``charge_drift`` (the function, and the trajectory's observable) is ``Q(theta_{k+1}) - Q(theta_k)`` of the
    parameters as stored.  It was the difference of the two charges computed in float32, which cancels: an SGD step's
    drift ``eta^2 Q(g)`` lies far below ``eps Q`` at small learning rates, and came out as rounding (measured on this
    model at ``eta = 1e-3``: the rescale drift many times off the exact change of the stored parameters)."""
    group, params, loss = _mlp_step(None)
    grads = jax.grad(loss)(params)
    tx = optim.quotient_trajectory(optax.sgd(1e-3), group, observables=("charges", "charge_drift"))
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    q0, s0, sb0 = _exact_charges(params)
    q1, s1, sb1 = _exact_charges(new)
    for drift in (qobs.charge_drift(group, params, updates), optim.observables_of(state)["charge_drift"]):
        d = np.asarray(drift["rescale/layers.0"], np.float64)
        assert np.max(np.abs(q1 - q0)) > 0  # the step moves the charges (by ~eta^2 |g|^2)
        np.testing.assert_allclose(d, q1 - q0, rtol=0, atol=1e-3 * np.max(np.abs(q1 - q0)))
        t = drift["translation/layers.1"]
        # S(theta_{k+1}) - S(theta_k) is the rounding of the stored step alone (S(g) = 0): to float32's resolution
        # of the step itself
        np.testing.assert_allclose(np.asarray(t["kernel"], np.float64), s1 - s0, rtol=0, atol=1e-9)
        np.testing.assert_allclose(float(t["bias"]), sb1 - sb0, rtol=0, atol=1e-9)


def test_float32_predicted_drift_of_a_small_decoupled_decay():
    """THEORY section 2: ``Q+ = (1 - eta lam)^2 Q + eta^2 Q(g)`` and ``S+ = (1 - eta lam) S`` exactly.  The prediction
    formed ``(1 - eta lam)^2 - 1`` and ``(1 - eta lam) - 1`` from ``a = 1 - eta lam`` rounded to float32, whose error
    (up to eps / 2) is a few percent of ``eta lam = 1e-6``: the predicted drift was 1.3% off the exact change of the
    charges over the same float32 step (computed here in float64 from ``theta`` and ``Delta``)."""
    group, params, loss = _mlp_step(None)
    lr, lam = 1e-3, 1e-3
    grads = jax.grad(loss)(params)
    updates = jax.tree.map(lambda g, t: -lr * (g + lam * t), grads, params)
    cross = jax.tree.map(jnp.zeros_like, qobs.charges(group, params))
    pred, _ = qobs.predict_charge_drift(group, params, grads, updates, cross, lr=lr, weight_decay=lam)
    wide = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    moved = jax.tree.map(lambda a, b: np.asarray(a, np.float64) + np.asarray(b, np.float64), params, updates)
    (q0, s0, sb0), (q1, s1, sb1) = _exact_charges(wide), _exact_charges(moved)
    np.testing.assert_allclose(np.asarray(pred["rescale/layers.0"], np.float64), q1 - q0, rtol=0,
                               atol=1e-4 * np.max(np.abs(q1 - q0)))
    t = pred["translation/layers.1"]
    np.testing.assert_allclose(np.asarray(t["kernel"], np.float64), s1 - s0, rtol=0,
                               atol=1e-4 * np.max(np.abs(s1 - s0)))
    # (the zero-initialised output bias: S_b = 0, and S(Delta) = -eta S(g) is float32's rounding of a zero sum)
    np.testing.assert_allclose(float(t["bias"]), sb1 - sb0, rtol=0, atol=1e-9)
