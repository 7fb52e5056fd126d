"""The Optax wrapper and the observables on cases beyond their other tests: an optimiser whose momentum is kept in a
narrower dtype, a preconditioner that is not like the parameters, arguments of the wrong kind."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quotient_sgd.observables import (
    charges,
    frozen_horizontal,
    gradient_noise,
    hessian_extremes,
    hvp_operator,
    lanczos_extremes,
    predict_charge_drift,
    projection_for,
    sharpness_horizontal,
    sharpness_preconditioned,
    sharpness_quotient,
)
from quotient_sgd.optim import SGDSpec, flatten_trajectory, quotient_trajectory

from test_optim_trajectory import CHEAP, apply_mlp, init_mlp, mlp_group


def _heavy_ball(accumulator_dtype, nesterov=False):
    return optax.chain(optax.trace(0.9, nesterov=nesterov, accumulator_dtype=accumulator_dtype),
                       optax.add_decayed_weights(0.01), optax.scale(-0.05))


@pytest.mark.parametrize("nesterov", [False, True])
def test_a_spec_for_a_momentum_kept_in_a_narrower_dtype_is_refused(nesterov):
    """optax.trace(..., accumulator_dtype=jnp.bfloat16) rounds the stored momentum at every step (and multiplies it
    by a Python-float momentum rounded to bfloat16, 0.9 -> 0.8984375), which the SGD charge identity does not contain:
    the prediction was off the observed drift by 15 times the step's drift on float32 parameters (30 steps of a 3-5-4-3
    MLP), with nothing to say so.  Such a spec is now refused at init, naming the accumulator's dtype; a spec with
    no momentum, or the momentum in the parameters' dtype, is accepted."""
    spec = SGDSpec(0.05, weight_decay=0.01, momentum=0.9, nesterov=nesterov)
    params = init_mlp(jax.random.key(0))
    tx = quotient_trajectory(_heavy_ball(jnp.bfloat16, nesterov), mlp_group(), spec=spec, observables=CHEAP)
    with pytest.raises(ValueError, match=r"momentum in \['bfloat16'\] \(accumulator_dtype\).*'float32'"):
        tx.init(params)
    # the same optimiser without a spec (drift observed), and SGD whose stored momentum is never read back
    quotient_trajectory(_heavy_ball(jnp.bfloat16, nesterov), mlp_group(), observables=CHEAP).init(params)
    plain = optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.05, momentum=0.0, accumulator_dtype=jnp.bfloat16))
    quotient_trajectory(plain, mlp_group(), spec=SGDSpec(0.05, weight_decay=0.01), observables=CHEAP).init(params)


def test_a_float32_momentum_of_float64_parameters_is_refused(x64):
    """The same with a float32 accumulator for float64 parameters: the prediction was 8e-5 of the drift off, where
    the identity holds to 1e-8; the momentum in the parameters' own dtype (bfloat16 parameters, default accumulator)
    is not refused."""
    spec = SGDSpec(0.05, weight_decay=0.01, momentum=0.9)
    tx = quotient_trajectory(_heavy_ball(jnp.float32), mlp_group(), spec=spec, observables=CHEAP)
    with pytest.raises(ValueError, match=r"momentum in \['float32'\].*'float64'"):
        tx.init(init_mlp(jax.random.key(0), dtype=jnp.float64))
    own = quotient_trajectory(_heavy_ball(None), mlp_group(), spec=spec, observables=CHEAP)
    own.init(init_mlp(jax.random.key(0), dtype=jnp.bfloat16))


def test_a_preconditioner_not_like_the_parameters_is_named():
    """sharpness_preconditioned took the preconditioner leaf by leaf as it came: a (2,) entry for a (2, 2) leaf was
    broadcast over its rows (a preconditioner the caller did not give, silently), and a scalar, a missing leaf or a
    shape that did not broadcast failed with a bare AttributeError / pytree structure / broadcasting error.  Each is
    now a ValueError naming preconditioner; one like the parameters gives the dense extremes of P^-1/2 H P^-1/2."""
    params = {"a": jnp.array([1.0, -0.5, 2.0]), "b": jnp.array([[1.0, 0.5], [-1.0, 2.0]])}

    def loss(p):
        return jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 3)

    key = jax.random.key(0)
    bad = [2.0, {"a": jnp.ones(3)}, {"a": jnp.ones(4), "b": jnp.ones((2, 2))},
           {"a": jnp.ones(3), "b": jnp.array([1.0, 4.0])}]
    for pre in bad:
        with pytest.raises(ValueError, match="sharpness_preconditioned: preconditioner must be a pytree like params"):
            sharpness_preconditioned(loss, params, pre, key=key, num_matvecs=7)
    pre = {"a": jnp.array([1.0, 2.0, 4.0]), "b": jnp.array([[1.0, 2.0], [4.0, 8.0]])}
    ex = jax.jit(lambda q: sharpness_preconditioned(loss, params, q, key=key, num_matvecs=7))(pre)  # (one program)
    # the Hessian is diagonal: 2 on a, 6 b on b; P^-1 H has those over P
    dense = np.concatenate([2 / np.asarray(pre["a"]), 6 * np.ravel(params["b"]) / np.ravel(pre["b"])])
    np.testing.assert_allclose([ex.top[0], ex.bottom[0]], [dense.max(), dense.min()], rtol=1e-5)


def test_hessian_and_noise_observables_name_a_group_or_function_of_the_wrong_kind():
    """The Hessian observables take (loss_fn, group, params) and the step observables (group, params, ...): the two
    swapped, or a number for the loss function or the projection, failed with a bare "'function' object has no
    attribute 'horizontal'" / "Expected a callable value, got 3.0" / "'int' object is not callable".  Each is now a
    TypeError naming the observable and the argument."""
    group = mlp_group()
    params = init_mlp(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 3))

    def loss(p):
        return jnp.mean(jnp.square(apply_mlp(p, x)))

    key = jax.random.key(0)
    cases = [
        (lambda: sharpness_horizontal(loss, loss, params, key=key),
         r"sharpness_horizontal\(loss_fn, group, .*got function"),
        (lambda: sharpness_quotient(group, loss, params, key=key), r"sharpness_quotient.*look swapped"),
        (lambda: hessian_extremes(3.0, params, key=key), r"hessian_extremes\(loss_fn, params, \.\.\.\): loss_fn must"),
        (lambda: hessian_extremes(loss, params, 3, key=key), "hessian_extremes: project must be None or a projection"),
        (lambda: hvp_operator(loss, params, "horizontal"), "hvp_operator: project must be None"),
        (lambda: sharpness_preconditioned(None, params, params, key=key), "sharpness_preconditioned.*loss_fn must"),
        (lambda: gradient_noise(loss, loss, params, lr=0.1), r"gradient_noise\(example_loss_fn, group, .*got function"),
        (lambda: gradient_noise(3, group, params, lr=0.1), r"example_loss_fn must be a function params -> \(B,\)"),
    ]
    for call, match in cases:
        with pytest.raises(TypeError, match=match):
            call()


def test_lanczos_projection_and_charge_prediction_name_a_bad_argument():
    """lanczos_extremes with a matvec that is not a function ("'int' object is not callable" from inside the
    iteration), frozen_horizontal given a loss function as group ("no attribute 'tangents'"), projection_for with an
    unknown method (taken for "loop", silently) and predict_charge_drift with a cross term of other components (a
    bare KeyError of a component's name) now name the argument."""
    group = mlp_group()
    params = init_mlp(jax.random.key(0))
    with pytest.raises(TypeError, match="lanczos_extremes: matvec must be a function"):
        lanczos_extremes(3, params)
    with pytest.raises(TypeError, match=r"frozen_horizontal\(group, params\): group must be a symmetry group"):
        frozen_horizontal(lambda p: 0.0, params)
    with pytest.raises(ValueError, match="projection_for: method must be 'loop', 'unrolled' or 'matfree', got 'lop'"):
        projection_for(group, params, "lop")
    with pytest.raises(ValueError, match="predict_charge_drift: cross must hold one c_k per charge"):
        predict_charge_drift(group, params, params, params, {}, lr=0.1)
    cross = jax.tree.map(jnp.zeros_like, charges(group, params))
    predict_charge_drift(group, params, params, params, cross, lr=0.1)  # the zeros of the first step are fine


def test_flatten_trajectory_names_a_bad_separator():
    """flatten_trajectory(..., sep=1) failed with a bare "'int' object has no attribute 'join'"; an empty separator
    ran the keys together ("chargesr0"); both are now a TypeError naming sep."""
    for sep in (1, "", None):
        with pytest.raises(TypeError, match="flatten_trajectory: sep must be a non-empty string"):
            flatten_trajectory({"charges": {"r0": jnp.zeros(2)}}, sep=sep)
    assert list(flatten_trajectory({"charges": {"r0": jnp.zeros(2)}}, sep=".")) == ["charges.r0"]
