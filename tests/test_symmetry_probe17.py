"""Regression tests for defects found by exercising the symmetry groups and models beyond the other tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd.models import MLP, Transformer
from quotient_sgd.symmetry import Product, SymmetryError, align, quotient_distance, verify


class _Counted(nnx.Module):
    """An MLP's layers beside an integer step counter, whose path ``("count",)`` sorts before ``("layers", ...)``:
    the first leaf of ``nnx.split(model)``'s state is the counter."""

    def __init__(self, rngs):
        self.count = nnx.Variable(jnp.int32(3))
        self.layers = MLP(3, (4, 5), 2, rngs=rngs).layers


def test_canonicalize_of_a_state_whose_first_leaf_is_an_integer_counter():
    """The sweeps of a rescale chain took their stopping tolerance from the dtype of the first leaf of the whole
    tree, ``finfo(int32)``: canonicalize / invariants / canonical_element of such a state (an integer variable no
    component acts on, listed first) failed with NumPy's bare ``data type int32 not inexact``.  The tolerance now
    comes from the cluster's own parameters; the counter is passed through."""
    model = _Counted(nnx.Rngs(0))
    group = MLP(3, (4, 5), 2, rngs=nnx.Rngs(0)).symmetries()
    state = nnx.split(model)[1]
    params = nnx.split(model, nnx.Param, ...)[1]
    c_state, c_params = group.canonicalize(state), group.canonicalize(params)
    assert int(c_state["count"][...]) == 3
    for p in ((0, "kernel"), (0, "bias"), (1, "kernel"), (1, "bias"), (2, "kernel")):
        a, b = c_state["layers"][p[0]][p[1]][...], c_params["layers"][p[0]][p[1]][...]
        assert np.array_equal(np.asarray(a), np.asarray(b)), p
    inv_s, inv_p = group.invariants(state), group.invariants(params)
    assert jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), inv_s, inv_p))


def _mlp_params(seed):
    model = MLP(3, (4,), 2, classifier=True, rngs=nnx.Rngs(seed))
    return model.symmetries(), nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])


@pytest.mark.parametrize("fn", [align, quotient_distance])
@pytest.mark.parametrize("leaf, shown", [(jax.random.key(0), "key<fry>"), (jnp.ones(2, bool), "bool"),
                                         (jnp.ones(2, jnp.complex64), "complex64")])
def test_align_and_distance_name_a_leaf_that_is_not_real_numbers(fn, leaf, shown):
    """A PRNG key beside the parameters (the state of an ``nnx.Rngs`` or ``Dropout`` in ``nnx.split(model)``), a
    boolean mask or a complex array failed inside the alignment with JAX's bare ``sub does not accept dtype
    key<fry>`` / ``lt does not accept dtype complex64``, naming neither the argument nor the leaf."""
    group, params = _mlp_params(0)
    bad = dict(params, rng=leaf)
    with pytest.raises(TypeError, match=rf"{fn.__name__}: params_a has a leaf of dtype {shown} at \('rng',\).*"
                                        r"nnx\.Param"):
        fn(group, bad, bad)


def test_quotient_distance_counts_an_integer_leaf_without_overflow():
    """An integer leaf beside the parameters (a step counter) was squared in its own dtype: two networks that
    differ only by a counter of 0 and 100000 were 37551 apart (int32 overflow; under strict promotion the int32
    sum beside the float32 ones raised a bare ``TypePromotionError``).  The distance is now 100000."""
    group, params = _mlp_params(0)
    a, b = dict(params, count=jnp.int32(0)), dict(params, count=jnp.int32(100000))
    assert float(quotient_distance(group, a, b)) == pytest.approx(100000.0, rel=1e-6)


@functools.partial(jax.jit, static_argnums=0)
def _sample_jit(group, key, params, scale):
    """``group.sample`` with a traced scale (one program for every case: the group is static, the rest arguments)."""
    return group.sample(key, params, scale=scale)


@pytest.mark.parametrize("make", [np.float64, lambda v: jnp.asarray(v, jnp.float64), lambda v: np.int64(round(v))])
def test_sample_reads_a_numpy_or_jax_scale_of_another_dtype(x64, make):
    """``scale`` is "a finite number >= 0", but a NumPy / JAX float64 or integer scale beside float32 parameters
    failed under strict dtype promotion with JAX's bare ``TypePromotionError`` (so did ``verify``, which passes it
    on); a traced float64 scale under ``jit`` too.  The elements are those of the Python float, in float32."""
    group, params = _mlp_params(0)
    key, scale = jax.random.key(1), make(2.0)
    want = group.sample(key, params, scale=float(scale))
    for got in (group.sample(key, params, scale=scale),
                _sample_jit(group, key, params, jnp.asarray(scale, jnp.float64))):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert a.dtype == b.dtype and np.allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)


def test_sample_component_of_bfloat16_attention_heads():
    """``sample_component`` called the component's sampler directly, not through the compiled program that computes
    low-precision parameters in float32: for a bfloat16 Transformer's GL heads it failed with ``NotImplementedError:
    Unsupported dtype bfloat16`` (XLA:CPU has no bfloat16 QR) where ``sample`` returned a float32 element."""
    model = Transformer(5, 3, 1, 1, 3, mlp_ratio=1, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    group = model.symmetries()
    g = group.sample_component(jax.random.key(0), params, "qk/blocks.0", scale=1.0)
    assert g.elements[0].dtype == jnp.float32 and g.elements[0].shape == (1, 3, 3)
    tokens = jnp.arange(3)[None, :]
    # (one compiled forward pass for both parameters: op by op the model compiled each of its operations)
    forward = jax.jit(lambda p: nnx.merge(graphdef, p, rest)(tokens))
    y0 = np.asarray(forward(params), np.float32)
    y1 = np.asarray(forward(group.act(g, params)), np.float32)
    assert float(np.max(np.abs(y1 - y0))) < 0.1  # (bfloat16 rounding of the moved heads)


def test_counts_and_flags_take_zero_dimensional_jax_and_numpy_values():
    """The models take ``jnp.int32(3)`` / ``jnp.bool_(True)`` for their sizes and flags, but the groups refused them
    with a self-contradicting message: ``Product(sweeps=jnp.int32(5))`` as ``sweeps must be an integer >= 1, got
    Array(5, dtype=int32)``, likewise ``newton=jnp.bool_(True)``, ``verify``'s ``num_samples`` and ``align`` /
    ``quotient_distance``'s ``rounds``, ``iters`` and ``canonical``.  They are now read as Python values (static
    settings); floats, bools as counts and arrays with axes are still refused."""
    group, _ = _mlp_params(0)
    product = Product(group.components, newton=jnp.bool_(True), sweeps=jnp.int32(5), newton_iters=np.int64(3),
                      dense_max=jnp.int32(0))
    assert (product.newton, product.sweeps, product.newton_iters, product.dense_max) == (True, 5, 3, 0)
    assert all(type(v) is int for v in (product.sweeps, product.newton_iters, product.dense_max))
    for bad in (dict(sweeps=jnp.float32(5)), dict(sweeps=jnp.asarray([5])), dict(newton=1), dict(sweeps=True)):
        with pytest.raises(SymmetryError, match=f"{next(iter(bad))} must be"):
            Product(group.components, **bad)
    a, b = {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}
    d = quotient_distance(Product([]), a, b, rounds=jnp.int32(1), iters=np.int64(2), canonical=jnp.bool_(True))
    assert float(d) == pytest.approx(3 ** 0.5)
    with pytest.raises(ValueError, match="rounds must be an integer >= 0"):
        align(Product([]), a, b, rounds=jnp.float32(1))
    model = MLP(2, (2,), 2, rngs=nnx.Rngs(0))
    assert verify(model, model.symmetries(), jnp.ones((2, 2)), jax.random.key(0), num_samples=jnp.int32(1)) < 1e-5


def test_quotient_distance_does_not_depend_on_the_order_a_product_lists_its_permutations(x64):
    """Weight matching and the coordinate descent matched the permutations in the order the product listed them,
    and that order picked the local minimum: for a 2-3-3-2 MLP the model's group gave 2.5856 and the same
    components listed in reverse 2.7528 (6.5% farther).  The permutations are now matched in the order of their
    parameters in the tree, whatever the listing order."""
    def make(seed):
        return MLP(2, (3, 3), 2, param_dtype=jnp.float64, rngs=nnx.Rngs(seed))

    group = make(0).symmetries()
    a, b = (nnx.split(make(s), nnx.Param)[1] for s in (0, 1))
    d_model = float(quotient_distance(group, a, b))
    d_reversed = float(quotient_distance(Product(group.components[::-1]), a, b))
    assert d_reversed == pytest.approx(d_model, rel=1e-9)


def test_gl_samples_of_width_one_spread_over_the_documented_interval():
    """``GL.sample`` placed the log singular values at ``linspace(-1.5 scale, 1.5 scale, d)``: for ``d = 1`` (a
    deep linear chain through one unit, a head with ``d_head = 1``) that is the single point ``-1.5 scale``, so
    every element was ``+-exp(-1.5 scale)`` whatever the key, never above 1 in magnitude.  A width-one element is now
    a random sign times ``exp(u)``, ``u ~ U(-1.5 scale, 1.5 scale)``: magnitudes on both sides of 1, within the
    interval, deterministic per key, equal under jit; the action stays in the group (the function unchanged)."""
    from quotient_sgd.models import DeepLinear

    model = DeepLinear(2, (1,), 1, rngs=nnx.Rngs(0))
    group = model.symmetries()
    _, params = nnx.split(model, nnx.Param)
    keys = jax.random.split(jax.random.key(0), 32)
    logs = np.array([np.log(np.abs(np.ravel(jax.tree.leaves(group.sample(k, params, scale=2.0))))) for k in keys])
    assert logs.min() < -0.5 and logs.max() > 0.5 and np.all(np.abs(logs) <= 3.0 + 1e-6)
    g = group.sample(keys[0], params, scale=2.0)
    jitted = jax.jit(lambda k: group.sample(k, params, 2.0))(keys[0])
    assert jax.tree.leaves(g)[0].item() == jax.tree.leaves(jitted)[0].item()
    x = jnp.array([[0.3, -1.2], [2.0, 0.5]])
    moved = nnx.merge(nnx.graphdef(model), group.act(g, params))
    np.testing.assert_allclose(moved(x), model(x), rtol=1e-5, atol=1e-6)
