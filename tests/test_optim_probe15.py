"""The Optax wrapper on cases beyond its other tests: an optimiser whose momentum is kept in a narrower dtype."""

import jax
import jax.numpy as jnp
import optax
import pytest

from quotient_sgd.optim import SGDSpec, quotient_trajectory

from test_optim_trajectory import CHEAP, init_mlp, mlp_group


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
