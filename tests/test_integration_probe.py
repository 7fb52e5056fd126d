"""Where the pieces meet: loss slices fed with what the trajectory keeps (Ritz vectors), and the slice metric."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import Grid, Grid2D, loss_slice, slice_flow


def _saddle(p):  # Hessian diag(1, -0.5, 0) on w, plus a bias term: lambda_min = -0.5, t* = 2
    return 0.5 * p["w"][0] ** 2 - 0.25 * p["w"][1] ** 2 + 0.1 * p["b"] ** 2


def _pt(w, b):
    return {"w": np.asarray(w, np.float64), "b": np.asarray(b, np.float64)}


_CENTRE, _E0, _E1 = _pt([0.1, 0.0, 0.3], 0.2), _pt([1.0, 0.0, 0.0], 0.0), _pt([0.0, 1.0, 0.0], 0.0)
_KW = dict(extent=0.5, n=9, eta=0.1, k=2, nu=0.01, dt=0.1)


def test_slice_takes_ritz_vectors_with_a_leading_axis(x64):
    """``eigenvectors_of(state)`` keeps Ritz vectors as one pytree with a leading axis k: with k = 2 they were
    broadcast against params (a (2, 3) "weight") and the slice was silently wrong; a flat vector failed inside
    tree_map with no hint.  Float32 vectors through float64 params are cast (strict promotion refused them)."""
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]).astype(jnp.float32), _E0, _E1)
    g = Grid(9, -0.5, 0.5, periodic=False)
    g2 = Grid2D(g, g)
    np.testing.assert_allclose(np.asarray(loss_slice(_saddle, _CENTRE, stacked, g2)),
                               np.asarray(loss_slice(_saddle, _CENTRE, (_E0, _E1), g2)), rtol=1e-12)
    one = jax.tree.map(lambda v: v[:1], stacked)
    np.testing.assert_allclose(np.asarray(loss_slice(_saddle, _CENTRE, one, g)),
                               np.asarray(loss_slice(_saddle, _CENTRE, _E0, g)), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(loss_slice(_saddle, _CENTRE, one, g)),
                               np.asarray(loss_slice(_saddle, _CENTRE, _E0, g)), rtol=1e-12)
    with pytest.raises(ValueError, match="pytree like params"):
        slice_flow(_saddle, _CENTRE, jnp.asarray([1.0, 0.0, 0.0, 0.0]), **_KW)
    with pytest.raises(ValueError, match="pytree like params"):
        loss_slice(_saddle, _CENTRE, jax.tree.map(lambda v: jnp.stack([v, v, v]), _E0), g)


def test_slice_flow_needs_orthonormal_directions(x64):
    """Along a direction of norm 2 the slice's L'' is 4 lambda, so the flow's shock time (0.5) was a quarter of
    the one k steps of size eta see (2): refused now, or orthonormalised on request; the same for a
    non-orthogonal pair (same plane, so the same shock time after Gram-Schmidt)."""
    two = jax.tree.map(lambda v: 2.0 * v, _E1)
    with pytest.raises(ValueError, match="not orthonormal"):
        slice_flow(_saddle, _CENTRE, two, **_KW)
    r = slice_flow(_saddle, _CENTRE, two, orthonormalize=True, **_KW)
    assert float(r.shock_time) == pytest.approx(2.0, rel=1e-6)
    skew = jax.tree.map(lambda a, b: (a + b) / np.sqrt(2.0), _E0, _E1)
    with pytest.raises(ValueError, match="not orthonormal"):
        slice_flow(_saddle, _CENTRE, (_E0, skew), **_KW)


@pytest.mark.slow
def test_slice_flow_orthonormalises_a_skew_pair(x64):
    """The 2-D flow (its compile is the cost) on a non-orthogonal pair spanning the saddle's plane."""
    skew = jax.tree.map(lambda a, b: (a + b) / np.sqrt(2.0), _E0, _E1)
    r2 = slice_flow(_saddle, _CENTRE, (_E0, skew), orthonormalize=True, **{**_KW, "n": 5})
    assert float(r2.shock_time) == pytest.approx(2.0, rel=1e-6)


def test_runner_build_names_what_it_takes():
    """``runner.build`` (the README's "same pieces from a config") takes the validated ``Settings``; handed the
    ``ConfigDict`` itself it failed inside ``dataclasses.replace`` ("replace() should be called on dataclass
    instances"), naming neither the argument nor the fix.  The validated config builds."""
    from quotient_sgd import config as qconfig
    from quotient_sgd import runner

    cfg = qconfig.default_config()
    with pytest.raises(TypeError, match=r"build: s must be a quotient_sgd\.config\.Settings.*got \w*ConfigDict.*"
                                        r"quotient_sgd\.config\.validate\(config\)"):
        runner.build(cfg)
    built = runner.build(qconfig.validate(cfg))
    assert built.settings.model.name == cfg.model.name and built.group is not None
