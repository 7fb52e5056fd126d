"""Group elements, keys and parameters from the wrong place are refused with errors that name them."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from quotient_sgd.models import MLP
from quotient_sgd.symmetry import Word, quotient_distance, verify


def _mlp(hidden=(4, 5)):
    model = MLP(3, hidden, 2, classifier=True, rngs=nnx.Rngs(0))
    return model, model.symmetries(), nnx.split(model, nnx.Param, ...)[1]


def test_act_names_an_element_sampled_at_other_widths():
    """An element sampled on a wider network (or on another model) failed inside the action with JAX's
    ``cannot reshape array of shape (6,) into shape [1, 5]``, or was silently broadcast; now a ValueError names the
    component and both shapes.  Elements taken from the group at these parameters still act, also under vmap."""
    _, group, params = _mlp((4, 5))
    _, _, wider = _mlp((4, 6))
    with pytest.raises(ValueError, match=r"rescale/layers\.1.*\(6,\).*\(5,\)"):
        group.act(group.sample_component(jax.random.key(1), wider, "rescale/layers.1", scale=2.0), params)
    other = Word((0,), (jnp.zeros(2),))  # a CNN's rescale of 2 channels, component 0 of its group
    with pytest.raises(ValueError, match=r"rescale/layers\.0.*\(2,\).*\(4,\)"):
        group.act(other, params)
    g = group.compose(group.sample_component(jax.random.key(1), params, "rescale/layers.1", scale=2.0),
                      group.sample_component(jax.random.key(2), params, "permutation/layers.1"))
    one = group.act(g, params)
    moved = jax.vmap(lambda e: group.act(e, params))(jax.tree.map(lambda a: jnp.stack([a, a]), g))
    assert all(jnp.array_equal(m[1], o) for m, o in zip(jax.tree.leaves(moved), jax.tree.leaves(one)))


def test_component_act_names_a_wrong_element():
    _, group, params = _mlp()
    rescale = group.component("rescale/layers.0")
    with pytest.raises(ValueError, match=r"rescale/layers\.0.*\(3,\).*\(4,\)"):
        rescale.act(jnp.zeros(3), params)
    translation = group.component("translation/layers.2")
    with pytest.raises(ValueError, match="translation/layers.2"):
        translation.act(jnp.zeros(5), params)


def test_compose_and_inverse_name_a_non_element():
    """``compose(g, 3)`` / ``inverse(3)`` failed with ``AttributeError: 'int' object has no attribute 'indices'``."""
    _, group, params = _mlp()
    g = group.identity(params)
    with pytest.raises(TypeError, match="must be a Word"):
        group.compose(g, 3)
    with pytest.raises(TypeError, match="must be a Word"):
        group.inverse(3)


@pytest.mark.parametrize("key", [0, jnp.array([0.0, 1.0]), jax.random.split(jax.random.key(0), 3)],
                         ids=["int", "float-array", "batch-of-keys"])
def test_sample_and_verify_name_a_key_that_is_not_a_key(key):
    """A seed, a float array or a batch of keys failed inside ``jax.random`` (``invalid PRNG key data`` / ``split
    accepts a single key``) without naming the argument."""
    model, group, params = _mlp()
    with pytest.raises(TypeError, match="sample: key=.*not a PRNG key"):
        group.sample(key, params)
    with pytest.raises(TypeError, match="sample_component: key=.*not a PRNG key"):
        group.sample_component(key, params, "rescale/layers.0")
    with pytest.raises(TypeError, match="verify: key=.*not a PRNG key"):
        verify(model, group, jnp.ones((2, 3)), key)
    # typed and legacy keys, and keys under vmap, are accepted
    group.sample(jax.random.PRNGKey(0), params)


def test_integer_parameters_are_named():
    """Integer parameters failed deep inside a canonicalisation with ``data type int32 not inexact``."""
    _, group, params = _mlp()
    ints = jax.tree.map(lambda x: x.astype(jnp.int32), params)
    for call in (lambda: group.canonicalize(ints), lambda: group.sample(jax.random.key(0), ints),
                 lambda: group.invariants(ints)):
        with pytest.raises(TypeError, match=r"dtype int32 at \('layers', 0, 'kernel'\).*floating-point"):
            call()


def test_quotient_distance_vmaps_over_group_elements(x64):
    """The weight-matching callback had no vmap rule (``vmap is only supported for the pure_callback primitive
    when vmap_method is ...``) and no JVP (``Pure callbacks do not support JVP``): quotient_distance could not be
    vmapped over group elements nor differentiated.  Now: distance(a, g.a) ~ 0 for a batch of g (here), and the
    gradient of distance(., b) equals a central finite difference (float64; the matching is constant nearby: the
    slow test below)."""
    model = MLP(3, (4,), 2, activation="tanh", param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    group, a = model.symmetries(), nnx.split(model, nnx.Param, ...)[1]
    keys = jax.random.split(jax.random.key(0), 3)
    # (vmapped inside one compiled program: vmapped eagerly, each batched operation compiled on its own)
    d = jax.jit(jax.vmap(lambda k: quotient_distance(group, a, group.act(group.sample(k, a), a))))(keys)
    assert d.shape == (3,) and float(jnp.max(d)) <= 1e-12


@pytest.mark.slow
def test_quotient_distance_gradient_is_the_finite_difference(x64):
    """The slow half of the previous test (several compilations): jax.grad through quotient_distance."""
    model = MLP(3, (4,), 2, activation="tanh", param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    group, a = model.symmetries(), nnx.split(model, nnx.Param, ...)[1]
    b = nnx.split(MLP(3, (4,), 2, activation="tanh", param_dtype=jnp.float64, rngs=nnx.Rngs(1)), nnx.Param, ...)[1]
    dist = lambda p: quotient_distance(group, p, b)  # noqa: E731
    grad = jax.grad(dist)(a)
    u = jax.tree.map(lambda x: jax.random.normal(jax.random.key(5), x.shape, x.dtype), a)
    h = 1e-6
    fd = (dist(jax.tree.map(lambda x, y: x + h * y, a, u)) - dist(jax.tree.map(lambda x, y: x - h * y, a, u))) / (2 * h)
    dot = sum(jnp.sum(g * y) for g, y in zip(jax.tree.leaves(grad), jax.tree.leaves(u)))
    assert abs(float(dot) - float(fd)) <= 1e-6 * abs(float(fd))
