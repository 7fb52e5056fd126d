"""Diffrax solves of the viscous Burgers (gradient) and Hamilton-Jacobi (value) flows (THEORY section 3)."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from ._curl import check_gradient_field
from ._custom_types import Array
from ._etd import CachedCoefficients, ETDRK4, etdrk4_coefficients, SemilinearTerm
from ._finite_volume import FiniteVolume
from ._grid import AnyGrid, Grid, Grid2D, real_field
from ._spectral import Spectral

_SOLVERS = ("auto", "etd", "tsit5", "kencarp")


class Solution(eqx.Module):
    """Saved states of a flow.  ``ts[-1] == t1``; ``ys[i]`` is the field at ``ts[i]``.

    ``BurgersSolution.ps`` / ``HJSolution.us`` name ``ys`` in THEORY's notation.  ``num_steps`` counts
    accepted + rejected steps.  ``spectral_tail`` (spectral scheme only, else ``None``): per saved field, the
    resolution check :meth:`Spectral.spectral_tail` (largest Fourier amplitude of the gradient in the top band of
    the kept modes relative to its largest one); above ``SPECTRAL_TAIL_WARN`` the grid under-resolves the flow
    and the solution rings (Gibbs).
    """

    ts: Array
    ys: Array
    grid: AnyGrid
    num_steps: Array
    spectral_tail: Array | None = None


class BurgersSolution(Solution):
    @property
    def ps(self) -> Array:
        return self.ys


class HJSolution(Solution):
    @property
    def us(self) -> Array:
        return self.ys


def as_scheme(scheme: str | eqx.Module) -> eqx.Module:
    """``"spectral"`` -> :class:`Spectral`, ``"fv"`` -> :class:`FiniteVolume` (minmod), ``"fv-smooth"`` ->
    ``FiniteVolume(limiter="smooth")``; scheme objects pass through."""
    if isinstance(scheme, (Spectral, FiniteVolume)):
        return scheme
    table = {"spectral": Spectral(), "fv": FiniteVolume(), "fv-smooth": FiniteVolume(limiter="smooth")}
    if scheme not in table:
        raise ValueError(f"scheme={scheme!r} is not one of {sorted(table)} or a Spectral/FiniteVolume object.")
    return table[scheme]


def _refuse_reverse_mode(cotangent, operand, *, message):
    raise ValueError(message)


# The identity, linear, whose transpose (what reverse-mode differentiation runs) raises a named error: Diffrax's
# ForwardMode adjoint integrates tangents inside its while loop, and jax.grad / jax.vjp through it failed in JAX's
# bare "Reverse-mode differentiation does not work for lax.while_loop or lax.fori_loop with dynamic start/stop
# values", naming neither the solver nor the adjoint.  Forward mode (jvp, jacfwd, nested) and vmap pass through it.
_forward_only_p = Primitive("quotient_sgd_hj_forward_mode_only")
_forward_only_p.def_impl(lambda x, *, message: x)
_forward_only_p.def_abstract_eval(lambda x, *, message: x)
mlir.register_lowering(_forward_only_p, lambda ctx, x, *, message: [x])
ad.deflinear2(_forward_only_p, _refuse_reverse_mode)
batching.primitive_batchers[_forward_only_p] = (
    lambda args, dims, *, message: (_forward_only_p.bind(*args, message=message), dims[0]))


def _forward_only(x, name: str):
    """``x`` itself, refusing reverse-mode differentiation with a ``ValueError`` naming ``adjoint``."""
    return _forward_only_p.bind(x, message=(
        f"{name}: adjoint=diffrax.ForwardMode() differentiates in forward mode only (jax.jvp, jax.jacfwd); reverse "
        "mode (jax.grad, jax.vjp) cannot go back through its loop.  For jax.grad use the default "
        "adjoint=diffrax.RecursiveCheckpointAdjoint() (or DirectAdjoint()), or take jax.jacfwd with ForwardMode()."))


class _Explicit(eqx.Module):
    scheme: Any
    grid: AnyGrid
    form: str = eqx.field(static=True)

    def __call__(self, t, y, nu):
        return self.scheme.rhs(self.grid, self.form, y, jnp.zeros_like(nu))


class _Implicit(eqx.Module):
    scheme: Any
    grid: AnyGrid
    form: str = eqx.field(static=True)

    def __call__(self, t, y, nu):
        return self.scheme.diffusion(self.grid, self.form, y, nu)


class _LatticeWithStops(dfx.AbstractStepSizeController):
    """Fixed steps on the lattice ``k h`` (``t0 = 0``), also stepping exactly onto each save time ``stops``.

    A save time between two lattice points splits that one step in two; every other step has size ``h``, so
    :class:`ETDRK4`'s cached coefficients serve them.  (``diffrax.ClipStepSizeController`` only wraps adaptive
    controllers.)
    """

    h: Array
    stops: Array  # sorted, last = t1

    def wrap(self, direction):
        return self

    def _next(self, t):
        h, tol = self.h, 1e-3  # tol: a fraction of a step, far above the rounding of t / h in float32 or 64
        # h = 0 at t1 = 0 (every stop is 0 then, and no step is taken): t / h was 0 / 0, whose NaN made jax.grad in
        # t1 NaN with save times (the derivative there is the right-hand side at y0)
        h = jnp.where(h > 0, h, jnp.ones_like(h))
        lattice = (jnp.floor(t / h + tol) + 1) * h
        later = self.stops > t + tol * h
        stop = jnp.min(jnp.where(later, self.stops, self.stops[-1]))
        return jnp.where(stop <= lattice + tol * h, stop, lattice)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        return self._next(t0), None

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
        return True, t1, self._next(t1), False, None, dfx.RESULTS.successful


class _LinearChord(dfx.VeryChord):
    """Diffrax's chord root finder for a stage equation that is linear in the unknown (the implicit viscous term
    of the IMEX split, ``nu Lap``): one iteration with the exact Jacobian (which diffrax builds once a step, at the
    same diagonal coefficient for every implicit stage of KenCarp4) solves it up to the linear solve's rounding,
    so the iteration stops there.

    ``VeryChord`` always takes a second iteration and judges convergence from the ratio of the two corrections;
    when the predictor is already within the tolerance the two are both rounding, their ratio ~1 reads as
    stagnation and the stage as a failed nonlinear solve: fixed steps of 0.005 on 128 spectral points in float32
    (p0 a two-mode sine, nu = 0.05) failed with "the diffrax solve failed", where 0.02 and 0.0005 ran.  A linear
    solve that failed, or a correction that is not finite, still fails the stage (``rtol`` / ``atol`` only scale
    the correction's size)."""

    def terminate(self, fn, y, args, options, state, tags):
        del fn, y, args, options, tags
        done = state.step >= 1
        bad = done & ~jnp.isfinite(state.diffsize)
        result = optx.RESULTS.where(bad, optx.RESULTS.nonlinear_divergence, optx.RESULTS.successful)
        linsolve_fail = state.result != optx.RESULTS.successful
        return linsolve_fail | done, optx.RESULTS.where(linsolve_fail, state.result, result)


class _SameDtypeInterpolation(dfx.KenCarp4.interpolation_cls):
    """KenCarp4's dense output in the dtype of the state.  Diffrax's polynomial coefficients are float64 NumPy
    arrays, so under ``jax_enable_x64`` a float32 state interpolated to a save time came out float64 and Diffrax
    failed writing it into the float32 buffer of saved states ("When doing `buffer.at[i].set(value)`, then `value`
    must have a dtype that can be promoted ..."), or failed in ``jnp.polyval`` under strict dtype promotion: every
    float32 solve with ``ts`` and ``solver="kencarp"``.  The same polynomial, its coefficients cast to the state's
    dtype."""

    def evaluate(self, t0, t1=None, left=True):
        del left
        if t1 is not None:
            return self.evaluate(t1) - self.evaluate(t0)
        same = self.t0 == self.t1  # (diffrax's linear_rescale: a zero-length step gives s = 0)
        s = jnp.where(same, jnp.zeros_like(t0), t0 - self.t0) / jnp.where(same, jnp.ones_like(t0), self.t1 - self.t0)

        def one(y0, ke, ki):
            c = jnp.asarray(self.coeffs, y0.dtype)
            sy = s.astype(y0.dtype)
            w = sy * jax.vmap(lambda row: jnp.polyval(row, sy))(c)
            return y0 + jnp.tensordot(w, (ke + ki).astype(y0.dtype), axes=1)

        return jax.tree.map(one, self.y0, *self.k)


class _KenCarp4(dfx.KenCarp4):
    """:class:`diffrax.KenCarp4` whose dense output keeps the state's dtype (:class:`_SameDtypeInterpolation`)."""

    interpolation_cls: ClassVar = _SameDtypeInterpolation


def _step_count(t1, dt, xp=jnp):
    """The number of fixed steps ``ceil(t1 / dt)`` (at least 1), in the dtype of ``t1`` and ``dt`` (``xp``: ``jnp``
    inside the solve, ``np`` for the same count from known values before it).  The ratio of two rounded decimals
    lands on either side of a whole number: it is taken down to it when within 8 ulp of the ratio (1e-9 at
    least).  A slack of 1e-9 alone was below float32's resolution: t1 = 0.09, dt = 0.01 in float32 gave the ratio
    9.000001 and 10 steps of 0.009, where float64 took the 9 steps of 0.01 the arguments ask for."""
    r = t1 / dt
    slack = xp.maximum(1e-9, 8 * xp.finfo(r.dtype).eps * r)
    return xp.maximum(xp.ceil(r - slack), 1.0)


def _concrete_value(value, dtype=float):
    """``value`` as a NumPy array (of ``dtype``; ``None`` keeps its own), or ``None`` when it is traced (e.g. under
    ``vmap`` or ``grad``: it cannot be checked here)."""
    try:
        return np.asarray(value, dtype=dtype)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
        return None


def _check_real(name: str, **values) -> None:
    """``TypeError`` naming the argument when a number (``nu``, ``t1``, ...) is not a real integer or float: a
    string (``"0.1"`` was read as 0.1), ``None``, a bool or a complex number (each failed with an unnamed error, or
    not at all).  ``None`` is skipped for the optional ``dt`` / ``dt0``; traced values are checked by dtype."""
    for arg, value in values.items():
        if value is None and arg in ("dt", "dt0"):
            continue
        dtype = None
        if value is not None and not isinstance(value, (str, bytes)):
            try:
                dtype = jnp.result_type(value)
            except TypeError:
                dtype = None
        if dtype is None or dtype == jnp.bool_ or not (jnp.issubdtype(dtype, jnp.floating)
                                                       or jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(f"{name}: {arg}={value!r} is not allowed; need a real number (an int or float, or a "
                            "real array of one; not a string, bool or complex number).")


def _concrete_negative(value, strict: bool):
    """``value`` when it is a known number below zero (or equal to zero with ``strict``), else ``None`` (also for
    traced values, which cannot be checked here)."""
    a = None if value is None else _concrete_value(value)
    if a is None:
        return None
    bad = (a <= 0) if strict else (a < 0)
    return value if bool(np.any(bad)) else None


def _concrete_non_finite(value):
    """``True`` when ``value`` is known (not traced) and has a NaN or infinite entry."""
    a = None if value is None else _concrete_value(value, None)
    return a is not None and a.dtype.kind in "fc" and not bool(np.all(np.isfinite(a)))


#: the smallest tolerance of adaptive stepping relative to the field's scale, in units of the field dtype's eps (see
#: :func:`_check_tolerance_floor`)
TOLERANCE_FLOOR_EPS = 1 / 16


def _check_tolerance_floor(name, form, field, y0, rtol, atol) -> None:
    """``ValueError`` naming ``rtol`` / ``atol`` when known tolerances ask for an error below what the field's dtype
    resolves: ``rtol + atol / S < TOLERANCE_FLOOR_EPS * eps`` with ``S`` the field's scale (``max|p0|``; for the
    value form ``max|u0 - mean(u0)|``, the deviation the solve integrates).  The controller's error estimate carries
    rounding of order ``eps S``, so below that floor its steps shrink with the tolerance instead of its fifth root:
    in float32 (64 and 256 points, sine and steepening front, both schemes) a tolerance of 1e-8 S took 160-380
    steps, 1e-9 S 680-1800, 3e-10 S 1100-5400, and rtol=1e-10, atol=1e-12 ran into max_steps=16384 on the front
    (256 points, nu = 0.01 / pi, t1 = 0.3; both schemes).  Traced tolerances or fields
    (under ``jit`` / ``vmap``) cannot be checked here and pass."""
    a = _concrete_value(y0, None)
    if a is None or rtol is None or atol is None:
        return
    a = np.asarray(a, np.float64)
    scale = float(np.max(np.abs(a - np.mean(a)))) if form == "hj" else float(np.max(np.abs(a)))
    if not (scale > 0):
        return  # a constant field: nothing to resolve
    eps = float(np.finfo(y0.dtype).eps)
    floor = TOLERANCE_FLOOR_EPS * eps
    asked = float(rtol) + float(atol) / scale
    if asked < floor:
        what = "max|u0 - mean(u0)|" if form == "hj" else f"max|{field}|"
        raise ValueError(
            f"{name}: rtol={float(rtol):.3g} and atol={float(atol):.3g} are not allowed for a {y0.dtype} field: "
            f"they ask for an error of rtol + atol / S = {asked:.3g} relative to the field's scale S = {what} = "
            f"{scale:.3g}, below what {y0.dtype} resolves (eps = {eps:.3g}); the step-size controller would shrink "
            f"its steps to nothing.  Need rtol + atol / S >= {floor:.3g} (e.g. rtol >= {floor:.3g}, or atol >= "
            f"{floor * scale:.3g}), or solve in float64: jax.config.update('jax_enable_x64', True) and a float64 "
            f"{field}.")


#: a known value field on a periodic axis whose step across the seam exceeds this many times its largest step between
#: neighbours inside the grid is refused as not periodic (see :func:`_check_periodic_values`)
_SEAM_RATIO = 4.0


def _check_periodic_values(name, u0, grid) -> None:
    """``ValueError`` naming ``u0`` when a known (not traced) value field is not periodic along a periodic axis of
    ``grid``: its step across the seam, ``|u0[0] - u0[-1]|``, exceeds :data:`_SEAM_RATIO` times its largest step
    between neighbours inside (plus rounding).  A loss is continuous, and on a periodic grid its samples continue
    across the seam as between any two neighbours; a jump there is data of a bounded domain (the loss ``u0 = x`` on
    16 periodic points: the finite-volume solve returned the flow of the sawtooth, 1.08 away from ``x - t / 2``,
    without a word).  Gradient fields are not checked: a Burgers field with a jump is a Riemann problem."""
    a = _concrete_value(u0, None)
    if a is None or a.size == 0:
        return
    grids = (grid,) if isinstance(grid, Grid) else grid.axes
    rounding = 64 * float(np.finfo(a.dtype).eps) * float(np.max(np.abs(a)))
    for axis, g in enumerate(grids):
        if not g.periodic:
            continue
        inner = float(np.max(np.abs(np.diff(a, axis=axis))))
        seams = np.abs(np.take(a, 0, axis=axis) - np.take(a, -1, axis=axis))
        seam = float(np.max(seams))
        if seam > _SEAM_RATIO * inner + rounding:
            where = "" if grid.ndim == 1 else f" along axis {axis}"
            raise ValueError(
                f"{name}: u0 is not periodic on this periodic grid{where}: its step across the seam, |u0[0] - "
                f"u0[-1]| = {seam:.4g}, is {seam / inner if inner > 0 else float('inf'):.3g} times its largest step "
                f"between neighbours inside ({inner:.4g}; at most {_SEAM_RATIO:g} allowed).  A periodic grid "
                f"[lo, hi) continues u0 from x = hi - dx to x = lo; for a loss on a bounded domain use "
                f"Grid(n, lo, hi, periodic=False) with scheme='fv' (or sample a periodic loss).")


def _check_periodic_tangential(name, p0, grid, bounded: str = " with scheme='fv'") -> None:
    """``ValueError`` naming ``p0`` when a known (not traced) 2-D gradient field jumps across the seam of a periodic
    axis in its component along the other axis (the tangential one): that step, ``|p0[b][0] - p0[b][-1]|`` along
    axis ``a``, exceeds :data:`_SEAM_RATIO` times the component's largest step along ``a`` inside (plus rounding).

    The gradient of a continuous periodic u has a continuous tangential component across any line, the seam
    included (its normal component may jump: a Riemann problem, as in 1-D); a tangential jump at the seam is the
    gradient of a loss that is not periodic, a curl concentrated on the seam.  The curl check reads such a jump as
    grid-scale content, within the derivatives' error: ``p0 = (y, x)``, the gradient of the saddle ``x y``, on a
    periodic grid (relative curl 1.04 at the seam on 64 x 64 nodes, that of a rotation) passed it, and the solvers
    integrated the gradient form of another equation without a word, where :func:`solve_hj` refuses ``u0 = x y``
    as not periodic; :func:`shock_time` read the jump as a Hessian eigenvalue of -8 (t* = 0.12 for 1 on 16 x 16
    nodes).  ``bounded``: what the advice adds to the bounded grid it suggests."""
    a = _concrete_value(p0, None)
    if a is None or a.size == 0:
        return
    rounding = 64 * float(np.finfo(a.dtype).eps) * float(np.max(np.abs(a)))
    for axis, g in enumerate(grid.axes):
        if not g.periodic:
            continue
        comp = a[1 - axis]
        inner = float(np.max(np.abs(np.diff(comp, axis=axis))))
        seam = float(np.max(np.abs(np.take(comp, 0, axis=axis) - np.take(comp, -1, axis=axis))))
        if seam > _SEAM_RATIO * inner + rounding:
            other, ratio = "xy"[1 - axis], seam / inner if inner > 0 else float("inf")
            raise ValueError(
                f"{name}: p0 is not the gradient of a periodic loss on this periodic grid: its component p_{other} "
                f"jumps across the seam of axis {axis} by {seam:.4g}, {ratio:.3g} "
                f"times its largest step along that axis inside ({inner:.4g}; at most {_SEAM_RATIO:g} allowed).  The "
                f"gradient of a continuous periodic u is continuous along the seam (only the normal component p_"
                f"{'xy'[axis]} may jump); this jump is a curl on the seam, e.g. p0 = (y, x) from the loss x y.  Sample "
                f"the gradient of a periodic loss, or use a bounded grid, Grid(n, lo, hi, periodic=False){bounded}.")


def _check_save_times(name, ts, t1) -> None:
    """``ValueError`` when known (not traced) save times are empty, not finite, or not non-decreasing within
    ``[0, t1]`` (the range only when ``t1`` is known too)."""
    if np.size(ts) == 0:  # the shape is known even when the values are traced
        raise ValueError(f"{name}: ts=[] is not allowed; pass ts=None to save at t1 only, or at least one save "
                         "time in [0, t1].")
    a = _concrete_value(ts)
    if a is None:
        return
    # shown to 7 significant digits: float32 save times read as given (0.05, not 0.05000000074505806)
    shown = [float(f"{v:.7g}") for v in a.tolist()]
    end = _concrete_value(t1)
    rng = "[0, t1]" if end is None else f"[0, t1] = [0, {float(f'{float(end):.7g}')}]"
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: ts={shown} is not finite (a NaN or infinite entry); need finite, "
                         f"non-decreasing save times in {rng}.")
    if np.any(np.diff(a) < 0) or np.any(a < 0) or (end is not None and np.any(a > end)):
        raise ValueError(f"{name}: ts={shown} is not allowed; need non-decreasing save times in {rng}.")


def _real_axis_stability(solver) -> float | None:
    """``x*`` such that an explicit Runge-Kutta ``solver``'s stability function ``R`` has ``|R(x)| <= 1`` on
    ``[-x*, 0]`` (3.51 for Tsit5, 3.31 for Dopri5, 2 for Euler and Heun), or ``None`` for any other solver (ETDRK4
    treats the viscous term exactly, KenCarp implicitly: no such limit).  For a tableau ``(A, b)``,
    ``R(z) = 1 + z b^T (I - z A)^-1 1 = 1 + sum_j z^(j+1) b^T A^j 1`` (``A`` strictly lower triangular)."""
    if isinstance(solver, dfx.Euler):
        return 2.0
    tableau = getattr(solver, "tableau", None)
    if not isinstance(solver, dfx.AbstractERK) or tableau is None:
        return None
    rows = [np.asarray(r, np.float64) for r in tableau.a_lower]
    s = len(rows) + 1
    a = np.zeros((s, s))
    for i, r in enumerate(rows):
        a[i + 1, :r.size] = r
    b = np.asarray(tableau.b_sol, np.float64)
    return _stability_bound(tuple(float(c) for c in _stability_coefficients(a, b)))


def _stability_coefficients(a, b):
    coeffs, v = [1.0], np.ones(a.shape[0])
    for _ in range(a.shape[0]):
        coeffs.append(float(b @ v))
        v = a @ v
    return coeffs


@functools.lru_cache(maxsize=16)
def _stability_bound(coeffs: tuple[float, ...]) -> float:
    x = -np.linspace(0.0, 64.0, 640001)
    r = np.polyval(np.asarray(coeffs[::-1]), x)
    out = np.flatnonzero(np.abs(r) > 1.0 + 1e-12)
    return float(-x[out[0] - 1]) if out.size else 64.0


def _viscous_rate(scheme, grid) -> float | None:
    """The largest ``|eigenvalue|`` of the scheme's discrete Laplacian on ``grid`` (per unit viscosity): the
    spectral symbol's ``max |k|^2``, the three-point stencil's ``4 sin^2(pi m / n) / dx^2`` (``4 / dx^2`` on a
    bounded axis: an upper bound), summed over the axes; ``None`` for another scheme object."""
    grids = (grid,) if isinstance(grid, Grid) else grid.axes
    if isinstance(scheme, Spectral):
        return float(sum((2 * np.pi / g.length * np.max(np.abs(g.index_frequencies()))) ** 2 for g in grids))
    if isinstance(scheme, FiniteVolume):
        total = 0.0
        for g in grids:
            top = np.max(np.sin(np.pi * np.arange(g.n) / g.n) ** 2) if g.periodic else 1.0
            total += 4.0 * float(top) / g.dx**2
        return total
    return None


def _explicit_limit(scheme, grid, solver) -> tuple[float, float] | None:
    """``(limit, bound)``: an explicit solver's fixed step ``h`` must keep ``h nu <= limit = bound / rate``
    (:func:`_real_axis_stability`, :func:`_viscous_rate`), or its top viscous mode grows by ``|R(-h nu rate)| > 1``
    a step; ``None`` where there is no such limit."""
    bound = _real_axis_stability(solver)
    rate = None if bound is None else _viscous_rate(scheme, grid)
    return None if not rate else (bound / rate, bound)


_NOT_GRADIENT = (
    "In 2-D the solver integrates Burgers in the gradient form p_t = -grad(|p|^2 / 2) + nu Lap p, which is Burgers "
    "only for p = grad u (THEORY section 3): a rotational field would be solved in another equation.  Pass the "
    "value field to solve_hj(u0, grid, ...) (p = grad u solves Burgers), or p0 = grad u itself: exact (e.g. "
    "jax.grad of u at the nodes) or built by the solver's own derivatives (Spectral().derivative(grid, u) on a "
    "periodic grid); second-order differences (jnp.gradient) leave a curl of their O(dx^2) error, above the "
    "tolerance.")


#: Diffrax's marker for a root-finder tolerance taken from the step-size controller (its implicit solvers' default).
_STEPSIZE_TOL = getattr(getattr(dfx.ImplicitEuler(), "root_finder", None), "rtol", object())


def _check_solver_object(name, solver, scheme, fixed: bool) -> None:
    """``ValueError`` naming ``solver`` when a solver object cannot integrate this solve: :class:`ETDRK4` with a
    scheme other than the spectral one (it failed in a bare ``AttributeError``: 'FiniteVolume' object has no attribute
    'forward'), a diffrax solver for another term structure than one ODE term (``diffrax.KenCarp4()``,
    ``SemiImplicitEuler()``, SDE solvers: Diffrax's ``TermAndSolverIncompatible``, naming no argument), or one
    without an error estimate (``diffrax.Euler()``) with adaptive stepping (Diffrax's bare ``RuntimeError``), or an
    implicit one (``diffrax.Kvaerno5()``, ``ImplicitEuler()``) with fixed steps and a root finder without its own
    tolerances (Diffrax's bare ``ValueError`` about unspecified tolerances)."""
    what = f"{type(solver).__name__}()"
    if isinstance(solver, ETDRK4):
        if not isinstance(scheme, Spectral):
            raise ValueError(f"{name}: solver={what} needs the spectral scheme (diagonal viscous term); use "
                             "solver='tsit5' or 'kencarp' with finite volumes.")
        return
    if getattr(solver, "term_structure", None) is not dfx.AbstractTerm:
        raise ValueError(
            f"{name}: solver={what} is not allowed: it integrates terms of the structure "
            f"{getattr(solver, 'term_structure', None)}, where a diffrax solver passed here integrates the whole "
            "right-hand side as one ODE term (term_structure diffrax.AbstractTerm, e.g. diffrax.Tsit5(), Dopri5(), "
            "Kvaerno5(), ImplicitEuler()); for the IMEX split (explicit advection, implicit viscosity) pass "
            "solver='kencarp'.")
    root_finder = getattr(solver, "root_finder", None)
    if fixed and isinstance(solver, dfx.AbstractImplicitSolver) and any(
            getattr(root_finder, a, None) is _STEPSIZE_TOL for a in ("rtol", "atol", "norm")):
        # (Diffrax's bare 'A fixed step size controller is being used alongside an implicit solver' otherwise; with
        # the tolerances given, its default root finder still diverged here for Kvaerno3/5 on 16 points)
        raise ValueError(
            f"{name}: solver={what} is not allowed with fixed steps: an implicit diffrax solver takes its root "
            "finder's tolerances from the adaptive step-size controller, and fixed steps give it none; use adaptive "
            "stepping (the default: no dt), solver='kencarp' (IMEX, fixed steps allowed), an explicit solver, or "
            "give the root finder its own rtol, atol and norm (e.g. root_finder=optimistix.Chord(rtol=1e-6, "
            "atol=1e-8, norm=optimistix.rms_norm)).")
    if not fixed and not isinstance(solver, dfx.AbstractAdaptiveSolver):
        raise ValueError(
            f"{name}: solver={what} is not allowed with adaptive stepping (the default): it gives no error estimate "
            "for the step-size controller; pass a fixed step dt=... (or adaptive=False with dt0), or an adaptive "
            "solver (e.g. diffrax.Tsit5(), or diffrax.HalfSolver around this one).")


def _solve(form, name, y0, grid, *, nu, t1, ts, scheme, solver, rtol, atol, max_steps, dt0, adaptive,
           adjoint, progress, dt=None):
    scheme = as_scheme(scheme)
    if not isinstance(grid, (Grid, Grid2D)):
        raise ValueError(f"{name}: grid={grid!r} is not allowed; need a Grid (1-D) or Grid2D (e.g. Grid(n, lo, hi) "
                         "* Grid(m, lo, hi)).")
    field = "p0" if form == "burgers" else "u0"
    # (half precision, e.g. a bfloat16 network's loss slice: the FFTs and Diffrax's controllers need >= 32 bits)
    y0 = real_field(name, field, y0)
    dtype = y0.dtype
    want = grid.shape if (form == "hj" or grid.ndim == 1) else (2, *grid.shape)
    if y0.shape != want:
        what = "a value field (nx, ny)" if form == "hj" else "a gradient field (2, nx, ny)"
        raise ValueError(f"{name}: {field} has shape {y0.shape}; on this grid it must be {want}"
                         + (f" ({what} on a 2-D grid)." if grid.ndim == 2 else "."))
    if isinstance(scheme, Spectral) and not grid.periodic:
        raise ValueError(f"{name}: the spectral scheme needs a periodic grid; use scheme='fv' on bounded grids.")
    if isinstance(adjoint, dfx.BacksolveAdjoint):
        raise ValueError(
            f"{name}: BacksolveAdjoint is not supported: its backward-in-time solve of the viscous equation is "
            "anti-diffusive (ill-posed) and blows up. Use the default RecursiveCheckpointAdjoint()."
        )
    if isinstance(adjoint, dfx.ImplicitAdjoint):
        # it differentiates a steady state (the implicit function theorem at f(y(t1)) = 0): jax.grad of sum(u(t1)^2)
        # in nu came out 8.6e16 against -10.97 (16 spectral points, t1 = 0.1), without a word
        raise ValueError(
            f"{name}: adjoint=ImplicitAdjoint() is not allowed: it differentiates a steady state (the right-hand side "
            "zero at t1), and the flow at t1 is not one, so its derivatives are wrong.  Use the default "
            "RecursiveCheckpointAdjoint() (reverse mode), DirectAdjoint() or ForwardMode() (forward mode).")
    if not isinstance(adjoint, dfx.AbstractAdjoint):  # None or a string failed in a bare AttributeError ('loop')
        raise ValueError(
            f"{name}: adjoint={adjoint!r} is not allowed; need a diffrax adjoint object: RecursiveCheckpointAdjoint() "
            "(the default, reverse mode), DirectAdjoint() or ForwardMode() (forward mode).")
    _check_real(name, nu=nu, t1=t1, dt=dt, dt0=dt0)
    for arg, value, allowed in (("nu", nu, "nu >= 0 (the viscous equation runs forward in time; nu < 0 is "
                                 "anti-diffusive, ill-posed)"), ("t1", t1, "t1 >= 0"), ("dt", dt, "dt > 0"),
                                ("dt0", dt0, "dt0 > 0")):
        bad = _concrete_negative(value, strict=arg.startswith("dt"))
        if bad is not None:
            raise ValueError(f"{name}: {arg}={bad} is not allowed; need {allowed}.")
    for arg, value in ((field, y0), ("nu", nu), ("t1", t1), ("dt", dt), ("dt0", dt0)):
        if _concrete_non_finite(value):
            what = f"{arg} is not finite (a NaN or infinite entry)" if arg == field else f"{arg}={value} is not finite"
            raise ValueError(f"{name}: {what}; it must be finite.")
    if form == "hj":
        _check_periodic_values(name, y0, grid)
    if form == "burgers" and grid.ndim == 2:
        y0 = check_gradient_field(name, field, y0, grid, spectral=isinstance(scheme, Spectral), advice=_NOT_GRADIENT)
        # (after the curl check, whose message a rotation such as (-y, x) gets: this one catches what it lets through)
        _check_periodic_tangential(name, y0, grid)
    if isinstance(max_steps, bool) or not (isinstance(max_steps, (int, np.integer)) and max_steps >= 1):
        raise ValueError(f"{name}: max_steps={max_steps!r} is not allowed; need an integer >= 1.")
    # a Python int: the step budget is static (it sizes Diffrax's loop and buffers); a NumPy integer is an array to
    # the compiled solve, which traced it and failed inside diffeqsolve in a bare TracerBoolConversionError
    max_steps = int(max_steps)
    for arg, value in (("adaptive", adaptive), ("progress", progress)):
        if not isinstance(value, (bool, np.bool_)):  # a string or number chose by its truth value ("no" is True)
            raise ValueError(f"{name}: {arg}={value!r} is not allowed; need True or False.")
    if dt is None and adaptive:
        _check_real(name, rtol=rtol, atol=atol)  # a string was read as a number, True as a tolerance of 1
        tols = {}
        for arg, value in (("rtol", rtol), ("atol", atol)):
            a = _concrete_value(value)
            if a is not None and not (a.ndim == 0 and np.isfinite(a) and a >= 0):
                raise ValueError(f"{name}: {arg}={value!r} is not allowed; need a finite number >= 0 (the PID "
                                 "controller accepts every step when a tolerance is negative).")
            tols[arg] = a
        if all(a is not None for a in tols.values()) and tols["rtol"] == 0 and tols["atol"] == 0:
            raise ValueError(f"{name}: rtol=0 and atol=0 is not allowed; at least one tolerance must be > 0.")
        _check_tolerance_floor(name, form, field, y0, tols["rtol"], tols["atol"])
    # (a step of shape (1,), np.array([0.01]), failed inside diffeqsolve in Diffrax's bare "body_fun must have the
    # same input and output structure")
    for arg, value in (("nu", nu), ("t1", t1), ("dt", dt), ("dt0", dt0)):
        if value is not None and jnp.ndim(value) != 0:
            raise ValueError(f"{name}: {arg} must be a scalar, got shape {jnp.shape(value)}; for several values "
                             f"jax.vmap the solve over {arg}.")
    nu = jnp.asarray(nu, dtype)
    t1 = jnp.asarray(t1, dtype)
    if ts is not None:
        if np.ndim(ts) > 1:
            raise ValueError(f"{name}: ts must be a 1-D array of save times, got shape {jnp.shape(ts)}.")
        known = _concrete_value(ts, None)
        if (known.dtype if known is not None else jnp.result_type(ts)).kind not in "iuf":
            # a string was read as a number, [True] as the time 1.0, a complex time failed in a bare float()
            raise TypeError(f"{name}: ts={ts!r} is not allowed; need real save times (a number or a 1-D array of "
                            "them; not strings, bools or complex numbers).")
        ts = jnp.atleast_1d(jnp.asarray(ts, dtype))  # compared with t1 in the solve's precision
        _check_save_times(name, ts, t1)
    if solver not in _SOLVERS and not isinstance(solver, dfx.AbstractSolver):
        raise ValueError(f"{name}: solver={solver!r} is not one of {_SOLVERS} or a diffrax solver.")
    if not adaptive:
        if dt0 is None and dt is None:
            raise ValueError(f"{name}: adaptive=False needs a fixed step dt (or dt0).")
        dt = dt0 if dt is None else dt
    fixed = dt is not None
    if isinstance(solver, dfx.AbstractSolver):
        _check_solver_object(name, solver, scheme, fixed)
    if solver == "auto":
        solver = "etd" if isinstance(scheme, Spectral) else "tsit5"
    term = SemilinearTerm(scheme, grid, form)
    if solver == "etd":
        if not isinstance(scheme, Spectral):
            raise ValueError(f"{name}: solver='etd' needs the spectral scheme (diagonal viscous term); "
                             "use solver='tsit5' or 'kencarp' with finite volumes.")
        solver = ETDRK4()
    elif solver == "tsit5":
        solver = dfx.Tsit5()
    elif solver == "kencarp":
        # IMEX: advection explicit, viscosity implicit (dense Jacobian: O(n^3) per step, moderate grids only).
        term = dfx.MultiTerm(dfx.ODETerm(_Explicit(scheme, grid, form)), dfx.ODETerm(_Implicit(scheme, grid, form)))
        # The implicit part is linear, so one chord iteration is exact (see _LinearChord)
        chord_atol = max(1e-6, 1e3 * float(jnp.finfo(dtype).eps))
        solver = _KenCarp4(root_finder=_LinearChord(rtol=1e-3, atol=chord_atol, norm=optx.max_norm))
    limit = _explicit_limit(scheme, grid, solver) if fixed else None
    if limit is not None:
        # an explicit solver's fixed step beyond its stability interval for the stiff viscous term: the top modes
        # grow by |R(-h nu rate)| > 1 a step (Tsit5 on 32 spectral points, nu = 0.1, dt = 0.1 returned a field of
        # 1e231 against an O(1) solution, with only a warning that asked for 1e230 grid points)
        h_, nu_, t1_ = _concrete_value(dt), _concrete_value(nu), _concrete_value(t1)
        if h_ is not None and nu_ is not None and t1_ is not None and float(t1_) > 0:
            # in the solve's dtype, as _integrate counts them
            h_ = float(t1_) / float(_step_count(np.asarray(t1_, dtype), np.asarray(h_, dtype), np))
            if h_ * float(nu_) > limit[0] * (1 + 1e-9):
                raise ValueError(
                    f"{name}: dt={float(_concrete_value(dt)):.6g} is not allowed with the explicit solver "
                    f"{type(solver).__name__} at nu={float(nu_):.6g}: its steps h = t1 / ceil(t1 / dt) = {h_:.6g} "
                    f"are beyond its stability interval for the viscous term (h nu max|eig(Lap)| = "
                    f"{h_ * float(nu_) / limit[0] * limit[1]:.4g} > {limit[1]:.4g}), where the finest modes grow "
                    f"every step; need dt <= {limit[0] / float(nu_):.6g}, or solver='etd' (spectral) / "
                    "'kencarp' (implicit viscosity), or adaptive stepping.")
    if fixed and type(adjoint) is dfx.RecursiveCheckpointAdjoint and adjoint.checkpoints is None:
        try:  # concrete t1 and dt: the step count is known, so checkpoint every step (no recomputation)
            steps = _step_count(np.asarray(t1, dtype), np.asarray(dt, dtype), np)  # as _integrate counts them
            known = int(steps) + (0 if ts is None else int(np.size(ts))) + 1
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
            known = None
        saves = 1 if ts is None else 1 + int(np.size(ts))
        if known is not None and known * y0.nbytes * (4 + saves) <= 2**29:
            max_steps = min(known, max_steps)
            adjoint = dfx.RecursiveCheckpointAdjoint(checkpoints=max_steps)
    as_array = (lambda v: None if v is None else jnp.asarray(v, dtype))
    bounded = _bounded_advice(scheme, grid)
    sol = _integrate(form, name, grid, term, solver, y0, nu, t1, as_array(ts), as_array(dt), as_array(dt0),
                     as_array(rtol), as_array(atol), max_steps, adjoint, progress,
                     _max_steps_advice(scheme, solver) + bounded, None if limit is None else limit[0],
                     _blowup_advice(scheme, solver, fixed) + bounded)
    if isinstance(scheme, Spectral):
        sol = dataclasses.replace(sol, spectral_tail=jax.lax.stop_gradient(scheme.spectral_tail(grid, form, sol.ys)))
        _warn_under_resolved(name, form, grid, sol, nu)
    return sol


#: :class:`Solution.spectral_tail` above which a spectral solve warns that the grid under-resolves the flow.
SPECTRAL_TAIL_WARN = 1e-3


def _warn_under_resolved(name, form, grid, sol, nu) -> None:
    """``UserWarning`` when a known (not traced) spectral solution's tail exceeds :data:`SPECTRAL_TAIL_WARN`, with
    the grid size that resolves it: the viscous length ``nu / max|p|`` must span about 1.5 grid spacings (on
    THEORY's reference problem the tail is then below 1e-5), and at least twice the current size."""
    tail = _concrete_value(sol.spectral_tail)
    nu_ = _concrete_value(nu)
    if tail is None or nu_ is None or not np.any(tail > SPECTRAL_TAIL_WARN):
        return
    i = int(np.argmax(tail))
    y = jax.lax.stop_gradient(sol.ys[i])  # the primal value under jax.jvp (concrete outside jit)
    ys = _concrete_value(Spectral().derivative(grid, y) if form == "hj" else y)
    if ys is None:
        return
    grids = (grid,) if isinstance(grid, Grid) else grid.axes
    pmax = float(np.max(np.abs(ys)))
    if float(nu_) > 0:
        need = [max(2 * g.n, int(np.ceil(1.5 * g.length * pmax / float(nu_)))) for g in grids]
        advice = (f"use about n={need[0]}" if len(need) == 1 else f"use about {need[0]} x {need[1]} points") + \
            " (the viscous length nu / max|p| should span ~1.5 grid spacings), a larger nu, or scheme='fv'"
    else:
        advice = "nu=0 has no viscous length to resolve: use scheme='fv'"
    shape = "x".join(str(g.n) for g in grids)
    # the save time is traced under jax.grad / jax.jvp with respect to t1 (its primal value is concrete outside jit)
    when = _concrete_value(jax.lax.stop_gradient(sol.ts[i]))
    at = "" if when is None else f" at t={float(when):.4g}"
    warnings.warn(
        f"{name}: the spectral solution is under-resolved on the {shape} grid:{at} its "
        f"Fourier amplitude in the top modes is {float(tail[i]):.2g} of its peak (above {SPECTRAL_TAIL_WARN:g}; "
        f"a shock thinner than the grid rings, Gibbs); {advice}.  The check is in solution.spectral_tail.",
        UserWarning, stacklevel=3)


def _max_steps_advice(scheme, solver) -> str:
    """What to do when ``max_steps`` runs out, for this scheme and solver: part of the error's (static) message,
    so it depends only on what the compilation already does (never on nu, t1 or the grid values)."""
    if isinstance(scheme, Spectral):
        return ("Increase max_steps, loosen rtol/atol, or, if a shock is forming, use scheme='fv', more grid points "
                "or a larger nu.")
    if isinstance(solver, dfx.KenCarp4):
        return "Increase max_steps or loosen rtol/atol."
    return ("Increase max_steps or loosen rtol/atol: on finite volumes an explicit solver's stable step is limited "
            "by the viscous term, dt <= dx^2 / (2 nu), so it needs about t1 * 2 nu / dx^2 steps.")


def _bounded_advice(scheme, grid) -> str:
    """A static part of the max-steps and not-finite messages for finite volumes on a grid with a bounded axis: the
    ends continue the field's trend, so a flow compressing at an end blows up in finite time whatever the steps.
    The concave loss ``-x^2 / 2`` on 8 bounded points, run to t1 = 1.5 past its blow-up at t = 1 (``u = -x^2 / (2 (1
    - t)) - nu log(1 - t)``), was told to take a smaller dt (fixed steps) or more steps (adaptive, either solver),
    neither of which helps."""
    grids = (grid,) if isinstance(grid, Grid) else grid.axes
    if not isinstance(scheme, FiniteVolume) or all(g.periodic for g in grids):
        return ""
    return (" On a bounded grid the ends continue the field's trend (p linearly, u quadratically), so compression at "
            "an end is continued without bound: the flow of p0 = -c x (the loss -c x^2 / 2), p = -c x / (1 - c t), "
            "blows up at t = 1 / c whatever the steps (Cole-Hopf's integral diverges there).  If t1 is past 1 / c "
            "for the compression p0' = L'' = -c at an end, take a shorter t1, or a domain (a slice's extent and "
            "margin) that ends where the loss is convex.")


def _blowup_advice(scheme, solver, fixed: bool) -> str:
    """Why a solve's field is not finite and what to do, for this scheme and stepping (a static part of the error's
    message).  A finite-volume solve was told "use scheme='fv'" (the spectral scheme's advice)."""
    if isinstance(scheme, Spectral):
        return ("The grid under-resolves the flow (spectral schemes need the shock width ~4 nu / jump to span a few "
                "points): use scheme='fv', more grid points or a larger nu.")
    if fixed and _real_axis_stability(solver) is not None:
        return ("The explicit fixed steps are unstable: besides the viscous term (checked before the solve) the "
                "Lax-Friedrichs flux diffuses at a rate ~ max|p| dx, so a step needs about h (4 nu / dx^2 + 2 max|p| "
                "/ dx) <= 3.5 (Tsit5; per axis summed; the smooth limiter's flux up to sqrt(2) max|p|): use a "
                "smaller dt, adaptive stepping (dt=None) or solver='kencarp'.")
    return ("The finite-volume solve blew up: use a smaller dt or adaptive stepping (dt=None) with tighter rtol / "
            "atol.")


@eqx.filter_jit
def _integrate(form, name, grid, term, solver, y0, nu, t1, ts, dt, dt0, rtol, atol, max_steps, adjoint,
               progress, advice: str, limit: float | None = None, blowup: str = ""):
    """The numerical part of a solve, jitted as a whole (Python-level checks stay in :func:`_solve`): one
    compilation per grid / scheme / solver / stepping mode / save structure / step budget; nu, t1, ts, dt and the
    tolerances are traced, so other values reuse it.  With fixed steps and known (not traced) t1 and dt,
    :func:`_solve` sets the step budget and the checkpoints to the step count ``ceil(t1 / dt)`` (static), so each
    step count compiles once (a few seconds each, measured on 64 points); under ``jax.jit`` with dt or t1 traced
    they share one compilation."""
    dtype = y0.dtype
    fixed = dt is not None
    # traced values escape _solve's range checks (under jit / vmap / grad): a negative nu solved the anti-diffusive
    # equation, a negative t1 integrated backwards and a dt <= 0 took one step of size t1, each without a word,
    # and a save time beyond t1 or before an earlier one stopped in Diffrax's own message; refuse them before the
    # solve
    out_of_range = (nu < 0) | (t1 < 0)
    if fixed:
        out_of_range = out_of_range | (dt <= 0)
    if dt0 is not None:
        out_of_range = out_of_range | (dt0 <= 0)
    if ts is not None:
        out_of_range = out_of_range | jnp.any(ts < 0) | jnp.any(ts > t1) | jnp.any(jnp.diff(ts) < 0)
    # (ts passes through the check too, so that it runs before Diffrax's own check of the save times)
    y0, ts = eqx.error_if(
        (y0, ts), out_of_range,
        f"{name}: a traced nu, t1, dt, dt0 or save time is out of range; need nu >= 0, t1 >= 0, dt > 0, dt0 > 0 "
        "and non-decreasing save times ts in [0, t1].",
    )
    if fixed:
        # uniform steps h = t1 / ceil(t1 / dt) <= dt ending exactly at t1 (the step count is not differentiated)
        num = jax.lax.stop_gradient(_step_count(t1, dt))
        dt0 = t1 / num
        if limit is not None:  # (a traced nu, t1 or dt: the check of _solve, when the computation runs)
            y0 = eqx.error_if(
                y0, jax.lax.stop_gradient(dt0 * nu) > limit * (1 + 1e-6),
                f"{name}: a traced dt is beyond the explicit solver's stability interval for the viscous term; "
                f"need h * nu <= {limit:.6g} for the steps h = t1 / ceil(t1 / dt), or solver='etd' (spectral) / "
                "'kencarp' (implicit viscosity), or adaptive stepping.")
        if ts is None:
            controller = dfx.ConstantStepSize()
        else:
            stops = jnp.concatenate([jnp.sort(ts.reshape(-1)), t1[None]])
            controller = _LatticeWithStops(dt0, stops)
    else:
        # tolerances are arrays, not Python floats: a solve at another tolerance reuses the compilation
        controller = dfx.PIDController(rtol=rtol, atol=atol)
        if ts is not None:
            controller = dfx.ClipStepSizeController(controller, step_ts=ts)
    args = nu
    if fixed and isinstance(solver, ETDRK4):
        cdt = jax.eval_shape(term.forward, y0).dtype
        lin = term.linear(nu)
        if ts is None:
            args = CachedCoefficients(nu, dt0, etdrk4_coefficients(lin, dt0, cdt))
        else:
            # save times split steps: the coefficients' derivatives in the step size too (see CachedCoefficients)
            coeffs, dcoeffs = jax.jvp(lambda h: etdrk4_coefficients(lin, h, cdt), (dt0,), (jnp.ones_like(dt0),))
            args = CachedCoefficients(nu, dt0, coeffs, recheck=True, dcoeffs=jax.lax.stop_gradient(dcoeffs))
    saveat = dfx.SaveAt(t1=True) if ts is None else dfx.SaveAt(ts=ts, t1=True)
    # The value form is invariant under u -> u + c (both schemes see only differences and derivatives of u), but
    # the step-size controller's tolerance atol + rtol |u| is not: a loss level of 1000 over O(1) variations let
    # the error grow ~1000x.  Integrate the deviation from the initial mean and add the mean back (exact for the
    # discrete map; differentiable, the mean included).
    level = jnp.mean(y0) if form == "hj" else jnp.zeros((), dtype)
    with warnings.catch_warnings():
        # The only complex leaves are CachedCoefficients' diagonal factors, which multiply spectra inside a step;
        # the state and everything diffrax integrates are real.
        warnings.filterwarnings("ignore", message="Complex dtype support in Diffrax")
        sol = dfx.diffeqsolve(
            term, solver, t0=jnp.zeros((), dtype), t1=t1, dt0=dt0, y0=y0 - level, args=args, saveat=saveat,
            stepsize_controller=controller, adjoint=adjoint, max_steps=max_steps, throw=False,
            progress_meter=dfx.TqdmProgressMeter() if progress else dfx.NoProgressMeter(),
        )
    ys = sol.ys + level
    # at t1 = 0 no step is taken and the solve does not depend on t1: jax.grad gave 0 there, not the (right)
    # derivative of the flow, its right-hand side at y0 (0.66 at a node of -sin(pi x), nu = 0.05).  The term added
    # is zero in value and carries that derivative
    scheme = term.scheme if isinstance(term, SemilinearTerm) else term.terms[0].vector_field.scheme
    start = jnp.where(t1 == 0, t1 - jax.lax.stop_gradient(t1), jnp.zeros_like(t1))
    ys = ys.at[-1].add(start * scheme.rhs(grid, form, y0, nu))
    # traced values escape _solve's checks: a NaN t1 ends the solve at once (returning y0), a NaN nu, y0 or save
    # time runs into max_steps (adaptive) or fills the field with NaN (fixed steps); name the cause instead
    bad = ~jnp.isfinite(t1) | ~jnp.isfinite(nu) | ~jnp.all(jnp.isfinite(y0))
    if ts is not None:
        bad = bad | ~jnp.all(jnp.isfinite(ts))
    ys = eqx.error_if(
        ys, bad,
        f"{name}: nu, t1, ts or the initial field is not finite; all must be finite.",
    )
    ys = eqx.error_if(
        ys, sol.result == dfx.RESULTS.max_steps_reached,
        f"{name}: max_steps={max_steps} steps were taken before reaching t1. {advice}",
    )
    ys = eqx.error_if(
        ys, (sol.result != dfx.RESULTS.successful) & (sol.result != dfx.RESULTS.max_steps_reached),
        f"{name}: the diffrax solve failed before t1 (step size collapsed or a nonlinear solve failed). The "
        "field is probably blowing up: use scheme='fv', more grid points, or a larger nu.",
    )
    ys = eqx.error_if(
        ys, ~jnp.all(jnp.isfinite(ys)),
        f"{name}: the solution is not finite. {blowup}",
    )
    ts_out = sol.ts
    if isinstance(adjoint, dfx.ForwardMode):
        ys, ts_out = (_forward_only(a, name) for a in (ys, ts_out))
    cls = BurgersSolution if form == "burgers" else HJSolution
    return cls(ts=ts_out, ys=ys, grid=grid, num_steps=sol.stats["num_steps"])


def solve_burgers(p0, grid: AnyGrid, *, nu, t1, ts=None, scheme="spectral", solver="auto", rtol=1e-6,
                  atol=1e-8, max_steps: int = 16384, dt=None, dt0=None, adaptive: bool = True,
                  adjoint=dfx.RecursiveCheckpointAdjoint(), progress: bool = False) -> BurgersSolution:
    """Solve the viscous Burgers equation ``p_t + (p . grad) p = nu Lap p`` from ``p0`` (THEORY section 3).

    Args:
        p0: initial gradient field, shape ``(n,)`` (1-D) or ``(2, nx, ny)`` (2-D); real and finite.  Integer and
            half-precision (float16, bfloat16) fields are solved in float32 / the default float.  In 2-D it must
            be a gradient ``p0 = grad u``: the solver integrates the gradient form ``grad(|p|^2 / 2)``, which is
            Burgers only for curl-free fields.  Its curl relative to its largest gradient, ``|curl p0| /
            max|grad p0|``, must be within rounding plus the derivatives' truncation error on the field at every
            node (fourth-order differences, and spectral derivatives with the spectral scheme; see
            ``quotient_sgd/hj/_curl.py``), else a ``ValueError`` names p0 with the measured curl and tolerance; a
            traced p0 (under ``jit`` / ``vmap``) is checked through ``equinox.error_if`` when the computation runs.
            On a periodic axis a known p0's tangential component (``p_y`` across the seam of x, ``p_x`` across that
            of y) must continue across the seam as between its neighbours, a step there of at most 4 times its
            largest step inside, else a ``ValueError`` names p0: a jump there is the gradient of a loss that is not
            periodic (``p0 = (y, x)`` from ``x y``), a curl on the seam; the normal component may jump (a Riemann
            problem).  The check measures the value only: derivatives with respect to p0 are unchanged, in any
            direction; finite differences in p0 must perturb it along gradients too.  (To solve from a value field, use
            :func:`solve_hj`.)
        grid: :class:`Grid` or :class:`Grid2D`.
        nu: viscosity, a real number >= 0 (differentiable, vmappable).
        t1: final time, a real number >= 0 (differentiable).  Known values of ``nu``, ``t1``, ``dt``, ``dt0`` and
            ``ts`` out of range are refused with a ``ValueError`` naming them; traced ones (under ``jit``,
            ``vmap``, ``grad``) through ``equinox.error_if`` when the computation runs.
        ts: optional intermediate save times: finite, non-decreasing, in ``[0, t1]``, at least one (``None``
            saves at t1 only); the solution saves at ``(*ts, t1)``.
        scheme: ``"spectral"`` (periodic, smooth/viscous), ``"fv"`` / ``"fv-smooth"`` or a scheme object.
        solver: ``"auto"`` (ETDRK4 for spectral, Tsit5 for FV), ``"etd"``, ``"tsit5"``, ``"kencarp"``
            (IMEX: explicit advection, implicit viscosity), or a diffrax solver for the full right-hand side as one
            ODE term (``term_structure`` ``diffrax.AbstractTerm``; with adaptive stepping one with an error estimate,
            a ``diffrax.AbstractAdaptiveSolver``), or an :class:`ETDRK4` with the spectral scheme; other solver
            objects (``diffrax.KenCarp4()``: pass ``"kencarp"``; ``diffrax.Euler()`` adaptively) are refused
            with a ``ValueError`` naming ``solver``.
        rtol, atol: tolerances of the PID step-size controller (adaptive stepping, the default): finite, >= 0,
            not both 0, and not below the field dtype's resolution: known tolerances with ``rtol + atol / S <
            eps / 16`` (``S = max|p0|``, for :func:`solve_hj` ``max|u0 - mean(u0)|``; ``eps`` of the field's
            dtype: 7.45e-9 in float32, 1.39e-17 in float64) are refused with a ``ValueError`` naming them: below
            it the controller's error estimate is rounding and its steps shrink to nothing (in float32 a tolerance
            of 1e-8 S took 160-380 steps, rtol=1e-10 with atol=1e-12 ran into ``max_steps``).  For tighter
            tolerances solve in float64 (``jax.config.update("jax_enable_x64", True)``).  Traced tolerances (under
            ``jit`` / ``vmap``) are not checked.
        dt: fixed stepping instead: ``ceil(t1 / dt)`` equal steps of size ``t1 / ceil(t1 / dt) <= dt`` (plus a
            split step at each save time in ``ts`` that falls between them).  With ETDRK4 the phi-function
            coefficients are then built once per solve instead of once per step; this is the fast path when
            the step that reaches a target error is known (benchmarks/hj.py), and the one that
            differentiates exactly the map finite differences see.  With known (not traced) ``t1`` and ``dt`` the step
            count sets the solve's step budget and checkpoints (no recomputation in reverse mode, while they fit in 512
            MiB), so each step count compiles once; to sweep ``dt`` with one compilation, pass it traced
            (``jax.jit(lambda dt: solve_burgers(..., dt=dt, max_steps=...))``).  With an explicit solver (``"tsit5"``,
            or a diffrax explicit Runge-Kutta solver or ``Euler``) a step beyond its stability interval for the viscous
            term, ``h nu max|eig(Lap)| > x*`` (``x* = 3.51`` for Tsit5; ``max|eig(Lap)|`` is ``max|k|^2`` for the
            spectral scheme, ``4 / dx^2`` per axis for finite volumes), is refused with a ``ValueError`` naming ``dt``
            and the largest stable one (a traced one through ``equinox.error_if``): the finest modes would grow every
            step (Tsit5 on 32 spectral points at nu = 0.1 with dt = 0.1 returned a field of 1e231).  The nonlinear term
            tightens the limit (on finite volumes the flux's numerical diffusion adds about ``2 max|p| / dx`` per axis
            to ``nu max|eig(Lap)|``), so the check is necessary, not sufficient; a fixed-step solve that blows up all
            the same raises the not-finite error, saying so.
        max_steps: step budget, an integer >= 1 (finite, as reverse-mode autodiff needs); exceeding it raises an
            error.
        dt0, adaptive: initial step of adaptive stepping; ``adaptive=False`` with ``dt0`` means ``dt=dt0``.
        adjoint: a diffrax adjoint; RecursiveCheckpointAdjoint by default (reverse mode: ``jax.grad`` /
            ``jax.vjp``).  For forward mode (``jax.jvp``, ``jax.jacfwd``) pass ``diffrax.ForwardMode()``: the
            default's custom VJP refuses ``jvp``; reverse mode through ``ForwardMode()`` raises a ``ValueError``
            naming ``adjoint`` (``DirectAdjoint()`` serves both, at more memory).  BacksolveAdjoint is refused: it
            integrates the viscous equation backwards in time, which is anti-diffusive and blows up; so is
            ImplicitAdjoint, which differentiates a steady state (the flow at t1 is none: jax.grad in nu came out
            8.6e16 for -10.97), and a value that is not a diffrax adjoint (``None``, a string), each with a
            ``ValueError`` naming ``adjoint``.
        progress: show a tqdm progress meter.

    Returns:
        :class:`BurgersSolution` with ``.ts`` and ``.ps`` (last entry at ``t1``).

    Example:
        >>> g = Grid(256, -1.0, 1.0)       # resolves the reference problem until its shock forms (t = 1 / pi)
        >>> sol = solve_burgers(-jnp.sin(jnp.pi * g.x), g, nu=0.01 / jnp.pi, t1=0.3)
        >>> sol.ps.shape
        (1, 256)
    """
    return _solve("burgers", "solve_burgers", p0, grid, nu=nu, t1=t1, ts=ts, scheme=scheme, solver=solver,
                  rtol=rtol, atol=atol, max_steps=max_steps, dt0=dt0, adaptive=adaptive, adjoint=adjoint,
                  progress=progress, dt=dt)


def solve_hj(u0, grid: AnyGrid, *, nu, t1, ts=None, scheme="spectral", solver="auto", rtol=1e-6, atol=1e-8,
             max_steps: int = 16384, dt=None, dt0=None, adaptive: bool = True, adjoint=dfx.RecursiveCheckpointAdjoint(),
             progress: bool = False) -> HJSolution:
    """Solve the viscous Hamilton-Jacobi equation ``u_t + |grad u|^2 / 2 = nu Lap u`` from ``u0 = L``.

    Same arguments as :func:`solve_burgers`; ``u0`` has shape ``(n,)`` or ``(nx, ny)``.  Its exact solution is
    the Cole-Hopf transform (:func:`cole_hopf`), the coarse-grained loss of THEORY section 3; its mean is not
    held fixed.  The equation is invariant under ``u -> u + c``; the solve integrates the deviation from the mean
    of ``u0`` and adds the mean back, so that ``rtol`` / ``atol`` bound the error relative to the variation of
    the loss, not to its level.  On a periodic grid a known ``u0`` must continue across the seam as between its
    neighbours (a loss is continuous): a step ``|u0[0] - u0[-1]|`` above 4 times its largest step inside is refused
    with a ``ValueError`` naming ``u0`` (data of a bounded domain: use ``Grid(..., periodic=False)`` with
    ``scheme="fv"``).  Returns :class:`HJSolution` with ``.ts`` and ``.us``.
    """
    return _solve("hj", "solve_hj", u0, grid, nu=nu, t1=t1, ts=ts, scheme=scheme, solver=solver, rtol=rtol,
                  atol=atol, max_steps=max_steps, dt0=dt0, adaptive=adaptive, adjoint=adjoint, progress=progress,
                  dt=dt)
