"""The HJ / Burgers engine on cases beyond its other tests: scalar arguments given as one-element arrays, and loss
slices through parameters given as plain Python numbers, losses that are not functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import (FiniteVolume, Grid, cole_hopf, cole_hopf_gradient, cole_hopf_monte_carlo, loss_slice,
                             slice_flow, solve_burgers, solve_hj)


def test_a_step_given_as_a_one_element_array_is_refused_by_name():
    """``dt`` (or ``dt0``) of shape ``(1,)``, ``np.array([0.01])``, passed every check of the solve and failed inside
    ``diffeqsolve`` in Diffrax's bare "`body_fun` must have the same input and output structure" (the step's shape
    reached the loop's time); ``nu`` and ``t1`` of that shape were already refused by name.  A 0-d array is a scalar
    and is read as one."""
    g = Grid(8, -1.0, 1.0)
    p0 = -jnp.sin(jnp.pi * g.x)
    for kw in (dict(dt=np.array([0.01])), dict(dt0=np.array([0.01])), dict(dt=jnp.array([0.01, 0.02]))):
        arg = next(iter(kw))
        with pytest.raises(ValueError, match=f"{arg} must be a scalar, got shape"):
            solve_burgers(p0, g, nu=0.1, t1=0.05, **kw)
        with pytest.raises(ValueError, match=f"{arg} must be a scalar"):
            solve_hj(jnp.cos(jnp.pi * g.x), g, nu=0.1, t1=0.05, **kw)


def test_loss_slice_through_parameters_given_as_python_numbers():
    """``params`` may be any pytree of floats, and a Python float is one (``cole_hopf_monte_carlo`` takes it):
    ``loss_slice`` / ``slice_flow`` accepted ``params=0.3`` (or ``[0.3, -1.2]``, a dict with a float leaf) and
    then failed in a bare ``AttributeError: 'float' object has no attribute 'dtype'`` moving the leaf along the
    direction.  (A list of directions is a list of slice directions: one like a list of parameters is passed in a
    tuple.)  The slice is ``loss_fn(params + a d)``, checked against the loss at those points."""
    g = Grid(8, -1.0, 1.0, periodic=False)
    a = np.asarray(g.x, np.float64)
    got = np.asarray(loss_slice(lambda p: jnp.cos(p), 0.3, 1.0, g))
    np.testing.assert_allclose(got, np.cos(0.3 + a), rtol=1e-6, atol=1e-6)
    got = np.asarray(loss_slice(lambda p: p[0] ** 2 + 2 * p[1], [0.3, -1.2], ([0.6, 0.8],), g))
    np.testing.assert_allclose(got, (0.3 + 0.6 * a) ** 2 + 2 * (-1.2 + 0.8 * a), rtol=1e-6, atol=1e-6)
    params = {"w": jnp.array([0.5, -0.25]), "b": 2.0}
    got = np.asarray(loss_slice(lambda p: jnp.sum(p["w"]) * p["b"], params,
                                {"w": jnp.array([1.0, 0.0]), "b": 0.5}, g))
    np.testing.assert_allclose(got, (0.25 + a) * (2.0 + 0.5 * a), rtol=1e-6, atol=1e-6)


def test_a_loss_that_is_not_a_function_is_refused_by_name():
    """A loss that is not callable (a number, ``None``) failed in JAX's bare "Expected a callable value, got 3.0",
    naming neither the function nor the argument; the quadrature, the Monte Carlo estimator and the slices now
    refuse it with a ``TypeError`` naming ``loss`` / ``loss_fn``."""
    x = jnp.linspace(-1.0, 1.0, 5)
    with pytest.raises(TypeError, match="cole_hopf: loss=3.0 is not allowed"):
        cole_hopf(3.0, x, 0.1, 0.1)
    with pytest.raises(TypeError, match="cole_hopf_gradient: loss=None is not allowed"):
        cole_hopf_gradient(None, x, 0.1, 0.1)
    with pytest.raises(TypeError, match="cole_hopf_monte_carlo: loss_fn=3.0 is not allowed"):
        cole_hopf_monte_carlo(3.0, x, 0.1, 0.1, key=jax.random.key(0))
    with pytest.raises(TypeError, match="loss_slice: loss_fn=None is not allowed"):
        loss_slice(None, x, x, Grid(8, -1.0, 1.0, periodic=False))
    with pytest.raises(TypeError, match="slice_flow: loss_fn=2.0 is not allowed"):
        slice_flow(2.0, x, x / jnp.linalg.norm(x), extent=1.0, n=8, eta=0.1, k=1, nu=0.01)


def test_cole_hopf_2d_refuses_a_weight_that_no_node_resolves_across_its_narrow_axis(x64):
    """The 2-D quadrature checked the spacing by the total effective sample size ``1 / sum w_i^2``, which for a
    weight narrow along y and wide along x is the product of the two axes' and passed with one node across the narrow
    width: ``L = c y^2 / 2 + cos(pi x) / pi`` at t = 0.5, nu = 0.01 (separable, so u is the 1-D Cole-Hopf value of the
    cosine plus the exact quadratic part ``c y^2 / (2 (1 + c t)) + nu log(1 + c t)``) came out 5.4e-3 off at c = 1000
    with the default num, without a word.  Now each axis's effective sample size must reach 3 (as the 1-D one
    does): refused naming num, and at a num that resolves it the value is the exact one."""
    t, nu, c = 0.5, 0.01, 1000.0

    def loss(y):
        return 0.5 * c * y[1] ** 2 + jnp.cos(jnp.pi * y[0]) / jnp.pi

    pts = jnp.array([[0.3, -0.2], [0.013, 0.2]])
    with pytest.raises(ValueError, match="num=201 is too coarse"):
        cole_hopf(loss, pts, t, nu, ndim=2)
    u = np.asarray(cole_hopf(loss, pts, t, nu, ndim=2, num=801))
    exact = (np.asarray(cole_hopf(lambda y: jnp.cos(jnp.pi * y) / jnp.pi, pts[0], t, nu))
             + c * np.asarray(pts[1]) ** 2 / (2 * (1 + c * t)) + nu * np.log1p(c * t))
    np.testing.assert_allclose(u, exact, atol=1e-9)


def test_smooth_limiter_value_form_does_not_depend_on_where_a_periodic_grid_starts(x64):
    """On a periodic axis the finite-volume value form scaled its smooth limiter by the spread of the slopes of the
    padded field, which holds three of the n cells (those beside the seam) twice: the scheme depended on which node
    the samples start at.  The right-hand side of a rolled field was not the rolled right-hand side (3e-3 on random
    data), and a solve of a rolled loss differed from the rolled solve by 1.9e-4 on 16 points.  Now the spread is
    that of the n cells, and the right-hand side commutes with rolling the samples (1-D, and along each axis of a
    2-D grid) and with the mirror image ``u(x) -> u(-x)``."""
    rng = np.random.default_rng(3)
    fv = FiniteVolume(limiter="smooth")
    g = Grid(17, -0.3, 1.1)
    u = jnp.asarray(rng.normal(size=17))
    rhs = np.asarray(fv.rhs(g, "hj", u, 0.05))
    for k in (1, 5, 9):
        np.testing.assert_allclose(np.asarray(fv.rhs(g, "hj", jnp.roll(u, k), 0.05)), np.roll(rhs, k), atol=1e-12)
    # the mirror image: node i of [-hi, -lo) is -x_j, j = -i mod n (-lo and -hi are one point of the periodic grid)
    gm = Grid(17, -1.1, 0.3)
    idx = (-np.arange(17)) % 17
    np.testing.assert_allclose(np.asarray(fv.rhs(gm, "hj", u[idx], 0.05)), rhs[idx], atol=1e-12)
    g2 = Grid(9, 0.0, 1.0) * Grid(7, -1.0, 2.0)
    u2 = jnp.asarray(rng.normal(size=(9, 7)))
    rhs2 = np.asarray(fv.rhs(g2, "hj", u2, 0.05))
    for k, axis in ((2, 0), (3, 1)):
        np.testing.assert_allclose(np.asarray(fv.rhs(g2, "hj", jnp.roll(u2, k, axis=axis), 0.05)),
                                   np.roll(rhs2, k, axis=axis), atol=1e-12)
