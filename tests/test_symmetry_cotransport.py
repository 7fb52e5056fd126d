"""Gradients carried to another point of the orbit (``Group._cotransport``, behind
``observables.canonical_gradient``): each component's closed form equals the generic vector-Jacobian product of
its inverse's action, and the carried gradient is the gradient at ``g . theta`` (float64, random elements)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd import models
from quotient_sgd.observables import canonical_gradient
from quotient_sgd.symmetry import Group


@functools.cache  # (float64: called by the tests under jax.enable_x64 only; nothing mutates what it returns)
def _model(name):
    """``(group, params, jitted loss gradient)``: one model, input and compiled gradient per kind for the file."""
    if name == "mlp":
        m = models.MLP(5, (12, 9), 3, classifier=True, rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(4), (3, 5), jnp.float64)
    elif name == "cnn":
        m = models.CNN(1, (4, 6), 3, classifier=True, norm="layer", rngs=nnx.Rngs(1))
        x = jax.random.normal(jax.random.key(4), (3, 8, 8, 1), jnp.float64)
    else:
        m = models.Transformer(11, 16, 2, 2, 8, param_dtype=jnp.float64, rngs=nnx.Rngs(2))
        x = jax.random.randint(jax.random.key(4), (3, 8), 0, 11)
    graphdef, params = nnx.split(m, nnx.Param)
    params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)  # (on the host: no compile)
    group = m.symmetries()

    def loss(p):  # invariant under every declared symmetry (the logit shift included: log-softmax)
        return jnp.sum(jnp.sin(jax.nn.log_softmax(nnx.merge(graphdef, p)(x))))

    return group, params, jax.jit(jax.grad(loss))  # (eager, the gradient dispatched and compiled op by op)


def _rel(a, b):
    """``max |a - b| / max |b|`` over two trees, in numpy (eager jnp compiled each operation per leaf shape)."""
    a, b = ([np.asarray(x) for x in jax.tree.leaves(t)] for t in (a, b))
    scale = max(float(np.max(np.abs(y))) for y in b)
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b)) / scale


@pytest.mark.parametrize("name", ["mlp", "transformer", pytest.param("cnn", marks=pytest.mark.slow)])
def test_cotransport_closed_forms_equal_the_generic_vjp(name):
    with jax.enable_x64(True):
        group, params, _ = _model(name)
        flat, _ = group._flat(params)
        # drawn on the host (drawn by JAX, each leaf shape compiled a program of its own)
        cot = {p: jnp.asarray(np.random.default_rng(i).standard_normal(x.shape))
               for i, (p, x) in enumerate(flat.items())}
        g = group.sample(jax.random.key(7), params, scale=1.5)
        seen = set()
        for i, e in zip(g.indices, g.elements):
            c = group.components[i]
            if (type(c), getattr(c, "kind", None)) in seen:  # one of each kind of action (compiles are slow)
                continue
            seen.add((type(c), getattr(c, "kind", None)))
            closed = jax.jit(c._cotransport)(e, cot)
            generic = jax.jit(lambda e, cot, c=c: Group._cotransport(c, e, cot))(e, cot)
            assert _rel(closed, generic) < 1e-12, c.name


# (the Transformer and the CNN in the slow suite; test_cotransport_closed_forms_equal_the_generic_vjp checks the
# Transformer's cotransport here)
@pytest.mark.parametrize("name", ["mlp", pytest.param("transformer", marks=pytest.mark.slow),
                                  pytest.param("cnn", marks=pytest.mark.slow)])
def test_canonical_gradient_is_the_gradient_at_the_moved_point(name):
    with jax.enable_x64(True):
        group, params, grad = _model(name)
        params = group.act(group.sample(jax.random.key(3), params, scale=1.0), params)
        grads = grad(params)
        elements = [group.sample(jax.random.key(9), params, scale=1.5)]  # permutations, GL, rescales, shifts
        if name != "transformer":  # (the Transformer's canonical element is slow to compile; covered in slow tests)
            elements.append(group.canonical_element(params))
        carry = jax.jit(lambda p, g, k: canonical_gradient(group, p, g, k))  # (one trace per element structure)
        for k in elements:
            carried = carry(params, grads, k)
            # LayerNorm's epsilon makes the CNN's scale symmetry exact only to ~1e-8
            assert _rel(carried, grad(group.act(k, params))) < (1e-6 if name == "cnn" else 1e-11)
