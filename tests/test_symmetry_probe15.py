"""The compiled alignment program: each Gauss-Newton fit compiled once (the four first fits one scan over their
(target, start) pairs, equal to the fits run one by one), and ``quotient_distance(canonical=True)`` canonicalising
inside a compiled program, not op by op."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from quotient_sgd.symmetry import _align, quotient_distance
from quotient_sgd.symmetry._product import Product
from tests.helpers import assert_tree_allclose
from tests.symmetry_cases import mlp_group, mlp_params

WIDTHS = (2, 3, 3, 2)


def _points(dtype):
    group = mlp_group(WIDTHS)
    fa, _ = group._flat(mlp_params(jax.random.key(0), WIDTHS, dtype))
    fb, _ = group._flat(mlp_params(jax.random.key(1), WIDTHS, dtype))
    return group, fa, fb


def test_align_program_traces_gauss_newton_twice(monkeypatch):
    """One trace of the Gauss-Newton loop for the four first fits (a scan), one in the coordinate-descent loop:
    every copy is the whole group's action and Jacobian, and five copies made the first alignment of a small
    Transformer compile for ~50 s."""
    group, fa, fb = _points(jnp.float32)
    traced = []
    fit = _align._gauss_newton

    def counting(group, target, cur, iters):
        traced.append(iters)
        return fit(group, target, cur, iters)

    monkeypatch.setattr(_align, "_gauss_newton", counting)
    jax.make_jaxpr(functools.partial(_align._align_flat.__wrapped__, group, rounds=3, iters=8))(fa, fb)
    assert traced == [8, 8]


def test_stacked_fits_equal_fits_one_by_one(x64):
    """The scan over (target, start) pairs gives, row by row, the four fits run one at a time: ``b`` at ``a``;
    ``b``'s canonical point mapped back through ``a``'s canonical element, at ``a``; ``b``'s canonical point at
    ``a``'s; that fit mapped back, at ``a``."""
    group, fa, fb = _points(jnp.float64)

    # (the canonical elements and the starts in one compiled program: op by op they dispatched ~100 small programs)
    @jax.jit
    def starts(fa, fb):
        ka, kb = group._canonical_element(fa), group._canonical_element(fb)
        kinv = group._inverse(ka)
        return group._act(ka, fa), group._act(kb, fb), kinv

    ca, cb, kinv = starts(fa, fb)
    act = jax.jit(group._act)
    fits = jax.jit(_align._fits, static_argnums=(0, 6))(group, fa, ca, fb, cb, kinv, 8)
    gn = jax.jit(_align._gauss_newton, static_argnums=(0, 3))
    refs = [gn(group, fa, fb, 8), gn(group, fa, act(kinv, cb), 8), gn(group, ca, cb, 8)]
    refs.append(gn(group, fa, act(kinv, refs[2]), 8))
    for i, ref in enumerate(refs):
        row = jax.tree.map(lambda x, i=i: np.asarray(x)[i], fits)
        assert_tree_allclose(row, ref, rtol=1e-12, atol=1e-12)
    # the fits moved the points (a no-op scan would not pass for the wrong reason): b's fit is closer to a than b
    def sqdist(a, b):
        return sum(float(np.sum(np.square(np.asarray(a[p]) - np.asarray(b[p])))) for p in a)

    assert sqdist(fa, refs[0]) < sqdist(fa, fb)


def test_canonical_distance_canonicalises_compiled(monkeypatch):
    """``canonical=True`` canonicalises inside a compiled program (op by op it dispatched for ~40 s on a small
    Transformer), and equals the distance between the points ``group.canonicalize`` returns."""
    group = mlp_group((2, 4, 2))
    pa, pb = mlp_params(jax.random.key(2), (2, 4, 2)), mlp_params(jax.random.key(3), (2, 4, 2))
    eager = []
    canon = Product._canonicalize_flat

    def recording(self, flat):
        eager.append(not any(isinstance(x, jax.core.Tracer) for x in flat.values()))
        return canon(self, flat)

    monkeypatch.setattr(Product, "_canonicalize_flat", recording)
    d = quotient_distance(group, pa, pb, canonical=True)
    assert not any(eager), eager
    monkeypatch.undo()
    ref = quotient_distance(group, group.canonicalize(pa), group.canonicalize(pb))
    assert abs(float(d) - float(ref)) <= 1e-5 * float(ref)
    assert float(ref) > 0.1
