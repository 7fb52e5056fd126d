"""Regression tests for defects found by exercising the symmetry groups and models beyond the other tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd.models import Transformer
from quotient_sgd.symmetry import GL


def _max_abs_diff(a, b) -> float:
    """The largest entry of ``|a - b|`` over whole trees, in NumPy (eager ``jnp`` would compile each operation)."""
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _qk_head_params(seed):
    ks = jax.random.split(jax.random.key(seed), 4)
    shapes = {"w_q": (2, 5, 3), "b_q": (2, 3), "w_k": (2, 5, 3), "b_k": (2, 3)}
    return {n: jax.random.normal(k, shape, jnp.float64) for k, (n, shape) in zip(ks, shapes.items())}


def test_gl_sample_dilates_and_canonical_point_and_invariants_stay(x64):
    """``GL.sample`` drew ``U diag(exp(linspace(-1.5 scale, 1.5 scale))) V^T`` for ``d >= 2``: the same singular
    values for every key, with product 1, so ``|det g| = 1`` for every sampled element (log |det| within 1e-15 of
    0 over keys and heads) and no test under random group elements ever moved a head by a dilation.  The singular
    values are now random per key, the condition number still exactly ``exp(3 scale)``; the canonical point and the
    invariants (the bilinear form) are unchanged under such elements, and the canonical element reproduces the
    canonical point."""
    gl = GL(left=(("w_q",), ("b_q",)), right=(("w_k",), ("b_k",)), kind="qk")
    params = _qk_head_params(0)
    # (the elements' determinants and singular values in NumPy: eager jnp compiles each operation)
    elements = np.stack([np.asarray(gl.sample(jax.random.key(s), params, 1.0)) for s in range(6)])
    # (elements: keys, heads, 3, 3)
    log_det = np.log(np.abs(np.linalg.det(elements)))
    sv = np.linalg.svd(elements, compute_uv=False)
    assert float(np.std(log_det)) > 0.3, log_det
    assert np.allclose(sv[..., 0] / sv[..., -1], np.exp(3.0), rtol=1e-10)
    assert float(np.max(sv)) <= np.exp(3.0) * (1 + 1e-12) and float(np.min(sv)) >= np.exp(-3.0) * (1 - 1e-12)

    canon0, inv0 = gl.canonicalize(params), gl.invariants(params)
    for g in elements[:3]:
        g = jnp.asarray(g)
        moved = gl.act(g, params)
        assert _max_abs_diff(gl.canonicalize(moved), canon0) < 1e-10
        assert _max_abs_diff(gl.invariants(moved), inv0) < 1e-10
        assert _max_abs_diff(gl.act(gl.canonical_element(moved), moved), canon0) < 1e-10


@pytest.mark.slow
def test_a_transformer_is_unchanged_under_dilating_gl_elements(x64):
    """The Transformer variant of the test above: under elements of its whole group whose GL parts dilate, its
    function, canonical point and invariants are unchanged (float64)."""
    model = Transformer(7, 6, 2, 1, 4, mlp_ratio=1, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    group = model.symmetries()
    tokens = jax.random.randint(jax.random.key(1), (2, 4), 0, 7)
    forward = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens))
    f0, canon0, inv0 = forward(params), group.canonicalize(params), group.invariants(params)
    for seed in range(2):
        g = group.sample(jax.random.key(seed), params, 1.0)
        dets = [jnp.abs(jnp.linalg.det(e)) for c, e in zip(group.components, g.elements) if isinstance(c, GL)]
        assert max(float(jnp.max(jnp.abs(jnp.log(d)))) for d in dets) > 0.1
        moved = group.act(g, params)
        assert _max_abs_diff(forward(moved), f0) < 1e-10
        assert _max_abs_diff(group.canonicalize(moved), canon0) < 1e-10
        assert _max_abs_diff(group.invariants(moved), inv0) < 1e-10
