"""HJ engine on cases beyond the other test_hj files: grid sizes, dtypes, non-finite input, jit (THEORY section 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import Grid, Spectral


@pytest.mark.parametrize("n", [63, 64, 96, 97])
@pytest.mark.parametrize("form", ["burgers", "hj"])
def test_dealiasing_leaves_no_aliased_mode(x64, n, form):
    """The product of cos(m x) with itself has modes 0 and 2m only; the dealiased nonlinearity may drop them but
    must not put anything elsewhere.  With n divisible by 3 the mode n/3 was kept and 2 n/3 aliased onto it."""
    g = Grid(n, 0.0, 2 * np.pi)
    s = Spectral()
    ms = np.arange(n // 2 + 1)
    fields = jnp.cos(jnp.asarray(ms, dtype=float)[:, None] * g.x[None, :])
    out = np.abs(np.asarray(jax.vmap(lambda f: s.nonlinear_hat(g, form, s.forward(g, f)))(fields)))
    allowed = np.zeros_like(out, dtype=bool)
    allowed[:, 0] = True
    allowed[ms[2 * ms <= n // 2], 2 * ms[2 * ms <= n // 2]] = True
    assert np.max(np.where(allowed, 0.0, out)) < 1e-9 * n * n, np.argwhere(~allowed & (out > 1e-9 * n * n))
