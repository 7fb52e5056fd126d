"""Models used beyond the other tests: the BatchNorm CNN's action on its running statistics given the wrong state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd.models import CNN


def test_act_on_batch_stats_refuses_a_state_without_the_running_statistics():
    """Given the parameters (nnx.split(model, nnx.Param, ...)[1]) instead of the non-parameter state, the action on the
    running statistics returned them unchanged, so the statistics paired with g . params were silently the old
    ones.  Refused naming the argument and the missing statistic; the real state is still moved: the running mean of
    each channel by its scale factor and reordered by the permutation (checked against the element directly)."""
    model = CNN(1, (3, 2), 2, norm="batch", kernel_size=2, rngs=nnx.Rngs(0))
    _, params, state = nnx.split(model, nnx.Param, ...)
    group = model.symmetries()
    g = group.sample(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"act_on_batch_stats: state has no running statistic at \('norms', 0, "
                                         r"'mean'\).*nnx.split\(model, nnx.Param, ...\)\[2\]"):
        model.act_on_batch_stats(group, g, params)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype), state)
    moved = model.act_on_batch_stats(group, g, state)
    mean = np.asarray(state["norms"][0]["mean"][...])
    for i, e in zip(g.indices, g.elements):  # the word's elements in order, on layer 0's statistics
        name = group.components[i].name
        if name == "scale/convs.0":
            mean = mean * np.exp(np.asarray(e, np.float64))
        elif name == "permutation/convs.0":
            mean = mean[np.asarray(e)]
    np.testing.assert_allclose(np.asarray(moved["norms"][0]["mean"][...]), mean, rtol=1e-6)


def test_act_on_batch_stats_names_a_group_or_element_of_the_wrong_kind():
    """A component passed for the group, or a component's element for the Word, failed with a bare AttributeError
    ('Scale' object has no attribute 'components'; no attribute 'indices'): TypeError naming the argument."""
    model = CNN(1, (3,), 2, norm="batch", kernel_size=2, rngs=nnx.Rngs(0))
    _, params, state = nnx.split(model, nnx.Param, ...)
    group = model.symmetries()
    scale = group.component("scale/convs.0")
    with pytest.raises(TypeError, match=r"act_on_batch_stats: group must be a Product.*got Scale"):
        model.act_on_batch_stats(scale, scale.sample(jax.random.key(0), params), state)
    with pytest.raises(TypeError, match=r"must be a Word"):
        model.act_on_batch_stats(group, scale.sample(jax.random.key(0), params), state)
