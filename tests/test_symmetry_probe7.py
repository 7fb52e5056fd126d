"""Probe of the symmetry groups beyond the shipped cases: elements far along orbits, opt-in solvers, compositions
and inverses, bad arguments."""

import jax
import jax.numpy as jnp

from quotient_sgd.symmetry import Product

from helpers import tree_rel_err
from symmetry_cases import mlp_group, mlp_params


def test_newton_canonicalize_with_a_logit_translation_reaches_the_canonical_point(x64):
    """``Product(newton=True)`` on an MLP classifier's rescale chain and logit translation, at points moved by
    elements of scale 3: jointly in (log-factors, shifts) the orbit norm is not convex, and Newton's steps crept
    along a flat valley and stopped at ``newton_iters`` 1e-6 to 2e-3 (relative) away from the canonical point
    (2-3 of 8 samples).  The shifts are now eliminated in closed form: the sweeps' point, to float64 rounding."""
    widths = (2, 3, 3, 2)
    p = mlp_params(jax.random.key(0), widths, dtype=jnp.float64)
    sweeps = mlp_group(widths, permutation=False)
    newton = jax.jit(Product(sweeps.components, newton=True).canonicalize)
    ref = jax.jit(sweeps.canonicalize)
    for seed in (0, 2):  # 4e-4 off before
        moved = sweeps.act(sweeps.sample(jax.random.key(seed), p, scale=3.0), p)
        assert tree_rel_err(newton(moved), ref(moved)) < 1e-10, seed
        assert tree_rel_err(newton(moved), ref(p)) < 1e-10, seed
