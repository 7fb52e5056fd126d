"""Probe of the symmetry groups of the shipped models: parameters holding NaN (a diverged run) given to
``align`` / ``quotient_distance``, eagerly and under ``jax.jit``."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from quotient_sgd import models
from quotient_sgd.symmetry import align, quotient_distance


def _mlp_with_nan(seed=0, value=jnp.nan):
    model = models.MLP(3, (3, 4), 2, activation="relu", classifier=True, rngs=nnx.Rngs(seed))
    params = nnx.split(model, nnx.Param)[1]
    bad = jax.tree.map(lambda x: x, params)
    bad["layers"][1]["kernel"][...] = bad["layers"][1]["kernel"][...].at[0, 0].set(value)
    return model.symmetries(), params, bad


@pytest.mark.parametrize("fn", [align, quotient_distance])
@pytest.mark.parametrize("which", ["params_a", "params_b"])
def test_nan_parameters_are_refused_naming_the_argument_and_the_parameter(fn, which):
    group, good, bad = _mlp_with_nan()
    args = (bad, good) if which == "params_a" else (good, bad)
    with pytest.raises(ValueError, match=rf"{fn.__name__}: {which} has non-finite values .*'layers', 1, 'kernel'"):
        fn(group, *args)


def test_infinite_parameters_are_refused_too():
    group, good, bad = _mlp_with_nan(value=-jnp.inf)
    with pytest.raises(ValueError, match=r"quotient_distance: params_b has non-finite values"):
        quotient_distance(group, good, bad)


def test_nan_parameters_under_jit_give_nan_instead_of_a_runtime_error():
    # the weight matching's assignment solver refused a NaN cost inside its host callback: an opaque XLA error
    group, good, bad = _mlp_with_nan()
    dist = jax.jit(lambda a, b: quotient_distance(group, a, b))
    assert bool(jnp.isnan(dist(good, bad))) and bool(jnp.isnan(dist(bad, good)))
    assert float(dist(good, good)) < 1e-5  # finite parameters still compare (the same program)
