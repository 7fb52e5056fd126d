"""The HJ / Burgers engine on cases beyond its other tests: solver and adjoint objects that cannot serve the solve,
the end-time derivative at t1 = 0 with save times."""

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import ETDRK4, find_shocks, FiniteVolume, Grid, solve_burgers, solve_hj


def test_solver_objects_that_cannot_integrate_the_solve_are_refused_by_name():
    """A solver object was handed to Diffrax as it was: ``ETDRK4()`` with finite volumes failed in a bare
    ``AttributeError`` ('FiniteVolume' object has no attribute 'forward'; the string ``'etd'`` was refused by name),
    ``diffrax.Euler()`` with the default adaptive stepping in Diffrax's bare ``RuntimeError`` ("Cannot use adaptive
    step sizes with a solver that does not provide error estimates"), and ``diffrax.KenCarp4()`` or
    ``SemiImplicitEuler()``, which integrate other term structures than one ODE term, in Diffrax's
    ``TermAndSolverIncompatible``; none named the argument.  Each is now a ``ValueError`` naming ``solver`` before
    any compilation, and the solvers that fit still run."""
    g = Grid(8, -1.0, 1.0)
    p0 = -jnp.sin(jnp.pi * g.x)
    refused = ((dict(scheme="fv", solver=ETDRK4()), r"solver=ETDRK4\(\) needs the spectral scheme"),
               (dict(solver=dfx.Euler()), r"solver=Euler\(\) is not allowed with adaptive stepping"),
               (dict(solver=dfx.KenCarp4()), r"solver=KenCarp4\(\) is not allowed: .*solver='kencarp'"),
               (dict(solver=dfx.SemiImplicitEuler(), dt=0.01), r"solver=SemiImplicitEuler\(\) is not allowed"))
    for kw, match in refused:
        for solve in (solve_burgers, solve_hj):
            with pytest.raises(ValueError, match=match):
                solve(p0 if solve is solve_burgers else jnp.cos(jnp.pi * g.x), g, nu=0.1, t1=0.1, **kw)
    # fixed steps with Euler, and ETDRK4 with the spectral scheme, are what they are for
    sol = solve_burgers(p0, g, nu=0.1, t1=0.1, solver=dfx.Euler(), dt=0.01)
    assert int(sol.num_steps) == 10 and bool(jnp.all(jnp.isfinite(sol.ps)))


def test_an_adjoint_that_does_not_differentiate_the_flow_is_refused_by_name():
    """``adjoint=diffrax.ImplicitAdjoint()`` ran, and ``jax.grad`` through it differentiated a steady state (the
    right-hand side zero at t1), which the flow at t1 is not: the derivative of ``sum(u(t1)^2)`` in nu came out
    8.6e16 against -10.97 (16 spectral points, t1 = 0.1, float64), without a word; ``adjoint=None`` or a string failed
    in a bare ``AttributeError`` ('loop').  Each is now a ``ValueError`` naming ``adjoint``, before any
    compilation."""
    g = Grid(8, -1.0, 1.0)
    u0 = jnp.cos(jnp.pi * g.x)
    for adjoint, match in ((dfx.ImplicitAdjoint(), r"adjoint=ImplicitAdjoint\(\) is not allowed: .*steady state"),
                           (None, r"adjoint=None is not allowed; need a diffrax adjoint"),
                           ("checkpoint", r"adjoint='checkpoint' is not allowed; need a diffrax adjoint")):
        for solve in (solve_burgers, solve_hj):
            with pytest.raises(ValueError, match=match):
                solve(u0, g, nu=0.1, t1=0.1, dt=0.05, adjoint=adjoint)


def test_the_end_time_derivative_at_t1_0_with_fixed_steps_and_save_times_is_finite():
    """With fixed steps and save times the step controller places its next step on the lattice ``k h`` with
    ``h = t1 / ceil(t1 / dt)``, computed as ``t / h``: at ``t1 = 0`` that was 0 / 0, and its NaN made ``jax.grad``
    in t1 NaN (the field itself was right: no step is taken), where without save times it is the right-hand side at
    ``y0`` (-19.74 for ``sum(u(t1))`` from ``cos(pi x)`` on 8 spectral points, nu = 0.1; ETDRK4, KenCarp and
    finite volumes alike).  It is now that derivative with save times too; the saved fields are ``u0``."""
    g = Grid(8, -1.0, 1.0)
    u0 = jnp.cos(jnp.pi * g.x)

    def total(t1):
        sol = solve_hj(u0, g, nu=0.1, t1=t1, ts=jnp.asarray([0.0]), dt=0.05, scheme="fv")
        return jnp.sum(sol.us[-1]), sol.us

    d, us = jax.grad(total, has_aux=True)(0.0)
    np.testing.assert_array_equal(np.asarray(us), np.asarray(jnp.stack([u0, u0])))
    rhs = float(jnp.sum(FiniteVolume().rhs(g, "hj", u0, 0.1)))  # the discrete u_t = -u_x^2 / 2 + nu u_xx
    assert abs(float(d) - rhs) < 1e-5 * abs(rhs), (float(d), rhs)


def test_find_shocks_on_a_bounded_grid_reports_no_front_at_an_end_and_mirrors_a_mirrored_field():
    """On a bounded grid the peak test compared an end node with its clipped neighbours: a peak at the left end
    passed (``s >= s``), one at the right end never did (``s > s``), and the parabola through the clipped samples
    put the left one half a cell outside the grid: ``-tanh((x + 1) / 0.2)`` on 16 points of [-1, 1] gave a front
    at x = -1.067 with half its jump (-0.999 of -2), its mirror image ``-p(-x)`` none.  A front has two sides:
    no end node of a bounded grid is one, and a field and its mirror image give mirrored fronts."""
    g = Grid(16, -1.0, 1.0, periodic=False)
    x = g.x
    for w in (0.2, 0.05):
        p = -jnp.tanh((x + 1) / w)
        for q in (p, -p[::-1]):
            for kw in ({}, dict(min_steepness=1.0), dict(include_inadmissible=True)):
                assert find_shocks(q, g, **kw).to_list() == [], (w, kw)
    # a front two nodes from the end is one, at the mirrored place in the mirrored field
    p = -jnp.tanh((x - float(x[2])) / 0.1)
    one, two = find_shocks(p, g).to_list(), find_shocks(-p[::-1], g).to_list()
    assert len(one) == len(two) == 1
    assert abs(one[0]["location"] - float(x[2])) < 0.2 * g.dx and abs(one[0]["location"] + two[0]["location"]) < 1e-5
    assert abs(one[0]["jump"] - two[0]["jump"]) < 1e-5


def test_a_finite_volume_blow_up_on_a_bounded_grid_names_the_compression_at_the_ends():
    """On a bounded grid the ends continue the field's trend, so ``p0 = -x`` (the loss ``-x^2 / 2``) flows as ``p =
    -x / (1 - t)`` and blows up at t = 1 whatever the steps.  Run to t1 = 1.5 the solve was told that its explicit
    fixed steps were unstable (use a smaller dt), or with adaptive steps to raise max_steps: neither helps.  The
    message now names the blow-up of a field compressing at an end, and what to do (a shorter t1, or a domain
    ending where the loss is convex); periodic grids are not told about ends."""
    from quotient_sgd.hj._solve import _bounded_advice

    g = Grid(8, -1.0, 1.0, periodic=False)
    with pytest.raises(Exception, match=r"not finite\..*blows up at t = 1 / c whatever the steps"):
        solve_burgers(-g.x, g, nu=0.1, t1=1.5, scheme="fv", dt=0.01).ps.block_until_ready()
    assert _bounded_advice(FiniteVolume(), Grid(8, -1.0, 1.0)) == ""
    assert "blows up" in _bounded_advice(FiniteVolume(), Grid(8, -1.0, 1.0) * Grid(8, -1.0, 1.0, periodic=False))
