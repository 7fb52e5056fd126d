"""The HJ / Burgers engine on cases beyond its other tests: the IMEX solver's stage solves at small fixed steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import cole_hopf_gradient, FiniteVolume, Grid, solve_burgers, solve_hj
from quotient_sgd.hj._solve import _check_tolerance_floor


def _loss(y):
    return jnp.cos(jnp.pi * y) / jnp.pi + 0.3 * jnp.sin(2 * jnp.pi * y) / (2 * jnp.pi)


def test_imex_fixed_small_steps_in_float32_do_not_fail_their_stage_solves():
    """KenCarp's implicit stage equation (the viscous term) is linear, but diffrax's chord iteration always took a
    second iteration and judged it by the ratio of the two corrections: where the predictor was already within the
    tolerance both were rounding, the ratio ~1 read as stagnation and the stage as a failed nonlinear solve.  With
    fixed steps there is no smaller step to retry: 20 steps of 0.001 on 64 spectral points in float32 failed with
    "the diffrax solve failed before t1" (steps of 0.005 ran).  One chord iteration with the exact Jacobian solves
    the linear stage; the solve now runs, to the Cole-Hopf solution."""
    g = Grid(64, -1.0, 1.0)
    p0 = -jnp.sin(jnp.pi * g.x) + 0.3 * jnp.cos(2 * jnp.pi * g.x)
    sol = solve_burgers(p0, g, nu=0.05, t1=0.02, scheme="spectral", solver="kencarp", dt=0.001)
    assert sol.ps.dtype == jnp.float32 and int(sol.num_steps) == 20
    exact = cole_hopf_gradient(_loss, g.x, 0.02, 0.05)
    assert float(jnp.max(jnp.abs(sol.ps[-1] - exact))) < 1e-4


def test_smooth_limiter_2d_burgers_field_constant_along_an_axis_is_its_1d_section(x64):
    """The smooth limiter's data scale S^2 of a 2-D gradient field was the spread of all its entries together, the
    mean taken across the two components: ``p = (f(x), 0)`` had another scale than the 1-D ``f``, and its 2-D solve
    drifted 4.8e-4 from the 1-D one (40 x 9 points, nu = 0.1, t = 0.5; the minmod limiter and the value form agreed
    to the tolerances).  Each component's spread about its own mean, summed, reduces to the 1-D scale exactly."""
    gx, gy = Grid(40, 0.0, 2 * np.pi), Grid(9, -1.0, 2.0, periodic=False)
    f = -jnp.sin(gx.x) + 0.3 * jnp.cos(2 * gx.x) + 0.2
    scheme = FiniteVolume(limiter="smooth")
    # compiled: op by op the limiter dispatched a few hundred small programs
    one = jax.jit(lambda y: scheme.rhs(gx, "burgers", y, 0.1))(f)
    for grid, p, k in ((gx * gy, jnp.stack([jnp.broadcast_to(f[:, None], (40, 9)), jnp.zeros((40, 9))]), 0),
                       (gy * gx, jnp.stack([jnp.zeros((9, 40)), jnp.broadcast_to(f[None, :], (9, 40))]), 1)):
        two = jax.jit(lambda y, grid=grid: scheme.rhs(grid, "burgers", y, 0.1))(p)
        section = two[0][:, 0] if k == 0 else two[1][0]
        np.testing.assert_allclose(np.asarray(section), np.asarray(one), rtol=0, atol=1e-13)
        assert float(jnp.max(jnp.abs(two[1 - k]))) == 0.0


def test_fixed_step_count_in_float32_is_the_one_the_arguments_ask_for():
    """``ceil(t1 / dt)`` fixed steps took the ratio down to a whole number within 1e-9, below float32's resolution:
    t1 = 0.09, dt = 0.01 in float32 gave the ratio 9.000001 and 10 steps of 0.009 (float64: 9 steps of 0.01; 21 of
    the 354 multiples k dt, k < 60, of six step sizes were off by one step).  The slack is now 8 ulp of the ratio,
    in the compiled count and in the step budget and stability check made before it."""
    g = Grid(16, -1.0, 1.0)
    sol = solve_burgers(-jnp.sin(jnp.pi * g.x), g, nu=0.1, t1=0.09, dt=0.01)
    assert sol.ps.dtype == jnp.float32 and int(sol.num_steps) == 9


def test_adaptive_tolerance_below_the_field_dtype_resolution_is_refused_before_compute():
    """An adaptive float32 solve asked for rtol=1e-10, atol=1e-12 (float64's usual tolerances) ran into
    max_steps=16384 with the spectral scheme (256 points, -sin(pi x), nu = 0.01 / pi, t1 = 0.3): the controller's
    error estimate carries rounding of order eps * max|p|, and below it the steps shrink with the tolerance
    instead of its fifth root (a tolerance of 1e-8 max|p| took 160-380 steps, 1e-9 680-1800, 3e-10 1100-5400).
    Known tolerances with rtol + atol / max|field| < eps / 16 are now refused, naming them, the dtype, the
    smallest allowed value and float64; float64 keeps its tolerances, and rtol=1e-10 with the default atol
    (1e-8 on a field of scale 1) still runs in float32."""
    g = Grid(16, -1.0, 1.0)
    p0 = -jnp.sin(jnp.pi * g.x)
    for scheme in ("spectral", "fv"):
        with pytest.raises(ValueError, match=r"rtol=1e-10 and atol=1e-12 .*float32.*>= 7.45e-09.*jax_enable_x64"):
            solve_burgers(p0, g, nu=0.05, t1=0.2, scheme=scheme, rtol=1e-10, atol=1e-12)
    # the value form: relative to the deviation from the mean (scale 10 here: the default atol is 1e-9 of it)
    with pytest.raises(ValueError, match=r"solve_hj: rtol=1e-10 and atol=1e-08 .*max\|u0 - mean\(u0\)\| = 10"):
        solve_hj(10 * jnp.cos(jnp.pi * g.x) + 100, g, nu=0.05, t1=0.2, scheme="fv", rtol=1e-10)
    g2 = Grid(8, -1.0, 1.0) * Grid(8, -1.0, 1.0)
    with pytest.raises(ValueError, match="atol=1e-09"):
        solve_hj(jnp.cos(jnp.pi * g2.x[0]), g2, nu=0.05, t1=0.2, rtol=0.0, atol=1e-9)
    # allowed: the loosest point tolerance at the field's scale is resolved, in float32 and float64
    _check_tolerance_floor("solve_burgers", "burgers", "p0", p0, np.float32(1e-10), np.float32(1e-8))
    _check_tolerance_floor("solve_burgers", "burgers", "p0", np.asarray(p0, np.float64), 1e-12, 1e-14)
    _check_tolerance_floor("solve_hj", "hj", "u0", jnp.zeros(16), 0.0, 1e-20)  # a constant field: no scale
