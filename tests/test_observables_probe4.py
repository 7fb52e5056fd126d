"""Observables on inputs the other tests do not use: predict_charge_drift's arguments of the wrong kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd import observables as qobs
from test_optim_trajectory import init_mlp, mlp_group


def _setup():
    params = init_mlp(jax.random.key(0))
    group = mlp_group()
    grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
    cross = jax.tree.map(jnp.zeros_like, qobs.charges(group, params))
    return group, params, grads, cross


def test_predict_charge_drift_takes_a_mask_function_and_refuses_masks_of_numbers():
    """A decay mask given as a function params -> booleans (as SGDSpec and optax take it) is the mask it returns
    (it failed with a bare "not a valid JAX array type"); a mask of numbers (0.5) decayed every leaf whose entry was
    not 0, silently: refused, naming decay_mask."""
    group, params, grads, cross = _setup()
    fn = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01, coupled_weight_decay=0.02)

    @jax.jit
    def three(params, grads, cross):  # (one compilation for the three)
        return tuple(qobs.predict_charge_drift(group, params, grads, grads, cross, **kw, **m)
                     for m in (dict(decay_mask=fn), dict(decay_mask=fn(params)), {}))

    by_fn, by_tree, unmasked = three(params, grads, cross)
    for a, b in zip(jax.tree.leaves(by_fn), jax.tree.leaves(by_tree)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(by_fn), jax.tree.leaves(unmasked)))  # the mask does act
    with pytest.raises(TypeError, match="decay_mask"):
        qobs.predict_charge_drift(group, params, grads, grads, cross, decay_mask=jax.tree.map(lambda x: 0.5, params),
                                  **kw)


def test_predict_charge_drift_names_arguments_of_the_wrong_kind():
    """nesterov="no" (truthy) ran the Nesterov recursion, gradients missing leaves were accepted; updates, velocity
    and charges_now of another structure failed with a bare pytree error, SymmetryError or KeyError."""
    group, params, grads, cross = _setup()
    part = {"l0": grads["l0"]}
    with pytest.raises(TypeError, match="nesterov"):
        qobs.predict_charge_drift(group, params, grads, grads, cross, lr=0.1, momentum=0.9, nesterov="no")
    for name, kw in (("grads", dict(grads=part)), ("updates", dict(updates=part)),
                     ("velocity", dict(velocity=part, nesterov=True, momentum=0.9))):
        args = dict(grads=grads, updates=grads)
        args.update({k: v for k, v in kw.items() if k in args})
        extra = {k: v for k, v in kw.items() if k not in args}
        with pytest.raises(ValueError, match=f"predict_charge_drift: {name} must be a pytree like params"):
            qobs.predict_charge_drift(group, params, args["grads"], args["updates"], cross, lr=0.1, **extra)
    with pytest.raises(ValueError, match="charges_now"):
        qobs.predict_charge_drift(group, params, grads, grads, cross, lr=0.1, charges_now={"r0": jnp.zeros(5)})


def test_hessian_k_and_projection_budget_of_the_wrong_kind_are_named():
    """sharpness_*(k="2") failed with a bare "'>' not supported between 'str' and 'int'" (the restart's k > 1, before
    lanczos_extremes' own check), frozen_horizontal(max_elements="x") likewise in its budget comparison."""
    group, params, _, _ = _setup()
    with pytest.raises(TypeError, match="k must be an integer, got '2'"):
        qobs.sharpness_raw(lambda p: jnp.sum(p["l0"]["kernel"] ** 2), params,
                           key=jax.random.key(0), k="2")
    for bad in ("x", -1):
        with pytest.raises(ValueError, match="frozen_horizontal: max_elements"):
            qobs.frozen_horizontal(group, params, max_elements=bad)
    with pytest.raises(ValueError, match="frozen_horizontal: max_build_flops"):
        qobs.frozen_horizontal(group, params, max_build_flops=None)
