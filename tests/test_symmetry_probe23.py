"""Symmetry groups on low-precision parameters: the gradient carried to the canonical point."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd.models import DeepLinear
from quotient_sgd.observables import canonical_gradient


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_canonical_gradient_of_low_precision_gl_models(dtype):
    """``canonical_gradient`` of a bfloat16 / float16 model with GL components (a deep linear stack, attention
    heads) raised XLA:CPU's bare ``NotImplementedError: Unsupported dtype`` (a GL head's inverse in that dtype).
    It is now computed in float32 and returned in the gradient's dtype: equal, to that dtype's rounding, to the
    vector-Jacobian product of the inverse element's action (``grad L(k . theta) = J_{k^-1}^T grad L(theta)``)
    evaluated independently in float32."""
    # (a deep linear stack: the cheapest model with a GL component; a Transformer's heads take the same path)
    model, x = DeepLinear(3, [2, 2], 2, param_dtype=dtype, rngs=nnx.Rngs(0)), jnp.ones((4, 3))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # (the gradient one compiled program, the casts below in NumPy: eager jnp compiles each operation)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest)(x).astype(jnp.float32)))))(params)
    group = model.symmetries()
    k = group.canonical_element(params)
    got = canonical_gradient(group, params, grads, element=k)

    up = lambda t: jax.tree.map(lambda a: jnp.asarray(np.asarray(a).astype(np.float32)), t)  # noqa: E731
    p32, g32 = up(params), up(grads)
    _, vjp = jax.vjp(lambda phi: group.act(group.inverse(k), phi), group.act(k, p32))
    want = vjp(g32)[0]

    for a, b, dt in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(grads)):
        assert a.dtype == dt.dtype
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.all(np.isfinite(a))
        scale = max(float(np.max(np.abs(b), initial=0)), 1e-3)
        np.testing.assert_allclose(a, b, atol=4 * float(jnp.finfo(dt.dtype).eps) * scale, rtol=0)
