"""Observables against independent float64 references on the cases the other tests leave out: steps that are not
finite (a diverged run) or exactly zero (a skipped step)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from quotient_sgd import models
from quotient_sgd import observables as qobs
from quotient_sgd.optim import SGDSpec, observables_of, quotient_trajectory


def _mlp():
    """``(group, params, loss)`` of a 2-3-1 float32 MLP on a fixed batch of 8."""
    model = models.MLP(2, (3,), 1, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 2))
    y = jnp.sin(x[:, :1])
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x) - y))

    return model.symmetries(), params, loss


def test_a_non_finite_step_gives_nan_curvature_and_effective_lr_not_zero():
    """The curvature and the effective learning rates divided by ``|Delta|^2`` / ``|g|^2`` only where that was
    ``> 0``, which a NaN is not: after a diverged step (an infinite gradient entry, then NaN parameters) the recorded
    ``effective_lr`` (global and every unit) and the curvature along the NaN step were exactly 0, and so the shock
    and fold numbers, while ``grad_norm`` and every other observable were NaN.  A zero step (``optax.apply_if_finite``
    skipping the non-finite gradient) still gives 0, as documented."""
    group, params, loss = _mlp()
    nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
    assert np.isnan(float(qobs.directional_curvature(params, params, nan)))
    eff = qobs.effective_lr(group, nan, nan, nan, nan)
    assert all(np.all(np.isnan(np.asarray(v))) for v in jax.tree.leaves(eff))
    zero = jax.tree.map(jnp.zeros_like, params)
    assert float(qobs.directional_curvature(params, params, zero)) == 0.0
    skipped = qobs.effective_lr(group, params, nan, zero, nan)  # a skipped step: zero update, NaN gradient
    assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(skipped))

    qt = quotient_trajectory(optax.sgd(0.1), group, spec=SGDSpec(0.1),
                             observables=("grad_norm", "curvature", "fold_number", "effective_lr"))
    update = jax.jit(lambda g, s, p: qt.update(g, s, p))
    state, p = qt.init(params), params
    for k in range(4):
        g = jax.grad(loss)(p)
        if k == 1:  # one infinite gradient entry: NaN parameters from step 2 on
            g = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), g)
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
        o = jax.device_get(observables_of(state))
        if k >= 2:  # step 3's curvature describes the NaN step 2
            assert np.isnan(o["grad_norm"])
            assert all(np.all(np.isnan(np.asarray(v))) for v in jax.tree.leaves(o["effective_lr"])), (k, o)
            assert np.isnan(o["curvature"]) and np.isnan(o["fold_number"]), (k, o)


def test_observables_of_trees_that_are_not_alike_are_refused_by_name():
    """``directional_curvature`` and ``effective_lr`` sum products over the zipped leaves of their arguments: a step
    missing its last leaf gave a curvature over the leaves the trees shared (on a 2-3-1 MLP 1.032 for the true 1.058),
    silently; now a ``ValueError`` names the argument and the paths that differ.  So for the functions that look
    leaves up by path (``angular_update``, ``charge_drift``, ``effective_lr``, ``grad_norm_canonical``): a list of
    the leaves failed with a bare ``KeyError`` or a ``SymmetryError`` about units, a bias of shape ``(n, 1)``
    broadcast against the ``(n,)`` one."""
    group, params, loss = _mlp()
    g0 = jax.grad(loss)(params)
    step = jax.tree.map(lambda x: -0.5 * x, g0)
    g1 = jax.grad(loss)(jax.tree.map(lambda a, b: a + b, params, step))
    leaves = jax.tree.leaves
    full = float(qobs.directional_curvature(leaves(g0), leaves(g1), leaves(step)))  # node types may differ
    np.testing.assert_allclose(full, float(qobs.directional_curvature(g0, g1, step)), rtol=1e-6)
    with pytest.raises(ValueError, match="directional_curvature: step must be a pytree like grad_prev"):
        qobs.directional_curvature(leaves(g0), leaves(g1), leaves(step)[:-1])
    with pytest.raises(ValueError, match="directional_curvature: grad_next"):
        qobs.directional_curvature(leaves(g0), [x.reshape(1, -1) for x in leaves(g1)], leaves(step))
    with pytest.raises(ValueError, match="effective_lr: grads_canonical must be a pytree like params"):
        qobs.effective_lr(group, params, g0, step, leaves(g0)[1:])
    # the functions that look leaves up by their paths (a list of the leaves: a bare KeyError; a bias step of shape
    # (n, 1) against the (n,) bias: an outer product summed, silently)
    column = jax.tree.map(lambda x: x[:, None] if x.ndim == 1 else x, step)
    for name, call in [("angular_update", lambda t: qobs.angular_update(group, params, t)),
                       ("charge_drift", lambda t: qobs.charge_drift(group, params, t)),
                       ("effective_lr", lambda t: qobs.effective_lr(group, params, g0, t, g0)),
                       ("canonical_gradient", lambda t: qobs.grad_norm_canonical(group, params, t))]:
        for bad in (leaves(step), column):
            with pytest.raises(ValueError, match=f"{name}: (updates|grads) must be a pytree like params"):
                call(bad)


@pytest.mark.parametrize("fn", [qobs.shock_number, qobs.fold_number])
def test_shock_and_fold_numbers_name_a_learning_rate_that_is_not_one(fn):
    """``shock_number`` / ``fold_number`` took ``lr`` as it came: a string failed in JAX's arithmetic with a bare
    "Only integer scalar arrays can be converted to a scalar index", a negative rate gave a negative shock number
    (``shock_number(-1.0, -1.0) = -1``) and a list of rates a vector, silently."""
    name = fn.__name__
    with pytest.raises(TypeError, match=f"{name}: lr='a' is not allowed"):
        fn("a", -1.0)
    with pytest.raises(ValueError, match=f"{name}: lr=-1.0 is not allowed"):
        fn(-1.0, -1.0)
    with pytest.raises(TypeError, match=f"{name}: lr=\\[0.1, 0.2\\]"):
        fn([0.1, 0.2], -1.0)
    assert float(fn(0.5, -2.0 if name == "shock_number" else 2.0)) == 1.0
    assert float(jax.jit(fn)(jnp.float32(0.5), jnp.float32(-3.0 if name == "shock_number" else 3.0))) == 1.5


def test_group_observables_name_a_group_argument_that_is_not_a_group():
    """The step observables take ``(group, params, ...)`` and the Hessian ones ``(loss_fn, group, params)``: a loss
    function passed first (``grad_norm_canonical(loss_fn, group, params)``) failed in a bare "'function' object has
    no attribute 'canonical_element'".  Each now raises a ``TypeError`` naming the observable and ``group``."""
    params = {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match=r"grad_norm_canonical\(group, params, \.\.\.\): group must be a symmetry "
                                        r"group \(model.symmetries\(\)\), got function \(a function"):
        qobs.grad_norm_canonical(lambda p, b: 0.0, params, params)
    for call in (lambda: qobs.charges("mlp", params), lambda: qobs.invariant_norms(None, params),
                 lambda: qobs.update_split_norms(params, params, params)):
        with pytest.raises(TypeError, match="group must be a symmetry group"):
            call()
