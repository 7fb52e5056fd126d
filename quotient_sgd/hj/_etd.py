"""Exponential time differencing as a Diffrax solver, for the stiff viscous term (THEORY section 3).

The semi-discrete HJ / Burgers systems are ``y' = L y + N(y)`` with L = nu Lap diagonal in Fourier space and
N the (non-stiff) nonlinearity.  Plain explicit stepping is limited by ``h nu |k|_max^2 = O(1)``; exponential
integrators treat L exactly.  :class:`ETDRK4` is the fourth-order scheme of Cox & Matthews (J. Comput. Phys.
176, 2002) with the phi-function evaluation of Kassam & Trefethen (SIAM J. Sci. Comput. 26, 2005) replaced by
Taylor series near 0; it is embedded with the stiffly second-order two-stage exponential Runge-Kutta method of
Hochbruck & Ostermann (Acta Numerica 19, 2010) that reuses its first two stages, which gives a local error
estimate for Diffrax's adaptive step-size controllers at no extra right-hand-side cost.

Why not an integrating factor on the whole interval?  ``v = exp(-L t) y`` makes the ODE non-stiff but grows
like ``exp(nu k^2 t)``: at N = 2048 on the reference problem that overflows float64.  Restarting the factor at
every step is exactly what an exponential Runge-Kutta method does.

The solver is an ordinary ``diffrax.AbstractAdaptiveSolver`` on the term :class:`SemilinearTerm`, so
``SaveAt``, step-size controllers, ``RecursiveCheckpointAdjoint`` and ``vmap`` work unchanged.  Its dense output
is linear between steps; :func:`solve_burgers` therefore makes the controller step onto every save time.

Fixed steps (``solve_burgers(..., dt=...)``): the coefficients ``exp(hL)``, ``phi_j(hL)`` depend on the step
only through ``h``, so :func:`etdrk4_coefficients` builds them once per solve and :class:`CachedCoefficients`
hands them to every step through ``args`` (closed over by the time loop, not carried or checkpointed).  A step
then costs four dealiased nonlinear evaluations plus one forward and one inverse real FFT, as in exponax's
ETDRK4 stepper; benchmarks/hj.py compares the two at matched error.
"""

from __future__ import annotations

import math
from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp

from ._custom_types import Array
from ._grid import AnyGrid

_TAYLOR_TERMS = 18


def _phi(j: int, z: Array) -> Array:
    """phi_j(z) = sum_k z^k / (k + j)!, for real z; Taylor series for |z| < 1, closed form elsewhere."""
    small = jnp.abs(z) < 1.0
    zs = jnp.where(small, z, jnp.zeros_like(z))
    series = jnp.zeros_like(z)
    for k in reversed(range(_TAYLOR_TERMS)):
        series = series * zs + 1.0 / math.factorial(k + j)
    zl = jnp.where(small, jnp.ones_like(z), z)
    closed = jnp.exp(zl)
    for k in range(j):
        closed = closed - zl**k / math.factorial(k)
    closed = closed / zl**j
    return jnp.where(small, series, closed)


class SemilinearTerm(dfx.AbstractTerm):
    """``dy/dt = L y + N(y)`` for a field on a grid, with ``L`` diagonal in the scheme's transform space.

    ``args`` is the viscosity nu (or :class:`CachedCoefficients` holding it).  ``vf`` returns the full
    right-hand side in physical space, so the term also
    works with any ordinary Diffrax solver (e.g. ``diffrax.Tsit5``); :class:`ETDRK4` uses the split.
    """

    scheme: eqx.Module
    grid: AnyGrid
    form: str = eqx.field(static=True)

    def vf(self, t, y, args):
        return self.scheme.rhs(self.grid, self.form, y, viscosity(args))

    def contr(self, t0, t1, **kwargs):
        return t1 - t0

    def prod(self, vf, control):
        return vf * control

    # -- the split ------------------------------------------------------------------------------------------
    def forward(self, y):
        return self.scheme.forward(self.grid, y)

    def inverse(self, yhat):
        return self.scheme.inverse(self.grid, yhat)

    def linear(self, args):
        lin = self.scheme.linear_symbol(self.grid, viscosity(args))
        if self.form == "burgers" and self.grid.ndim == 2:
            lin = lin[None]
        return lin

    def nonlinear(self, yhat, args):
        del args
        return self.scheme.nonlinear_hat(self.grid, self.form, yhat)


def etdrk4_coefficients(lin: Array, h, dtype) -> tuple[Array, ...]:
    """The diagonal ETDRK4 coefficients for one step of size ``h`` (Cox & Matthews 2002, eq. 26-29).

    Returns ``(e, e2, q, fa, fb, fc, g)`` cast to the (complex) spectral ``dtype``: ``e = exp(hL)``,
    ``e2 = exp(hL/2)``, ``q = h/2 phi1(hL/2)``, the fourth-order weights ``fa = h(phi1 - 3 phi2 + 4 phi3)``,
    ``fb = h(2 phi2 - 4 phi3)``, ``fc = h(4 phi3 - phi2)``, and ``g = -4 h phi3`` for the error estimate.
    The phi functions come from Taylor series near 0 and closed forms elsewhere (no contour integrals needed
    for a real diagonal L).

    The embedded second-order solution is ``e y + h(phi1 - 2 phi2) N0 + 2 h phi2 Na``; its difference from the
    fourth-order one is formed directly from the stages, ``fc (N0 + Nc) + g Na + fb Nb`` (the weights differ
    by ``fa - h(phi1 - 2 phi2) = fc`` and ``fb - 2 h phi2 = g``), instead of subtracting two O(1) spectra,
    which in float32 buries the O(h^3) estimate under rounding and stalls the step-size controller.
    """
    z = h * lin
    p1, p2, p3 = _phi(1, z), _phi(2, z), _phi(3, z)
    out = (jnp.exp(z), jnp.exp(0.5 * z), 0.5 * h * _phi(1, 0.5 * z), h * (p1 - 3 * p2 + 4 * p3),
           h * (2 * p2 - 4 * p3), h * (4 * p3 - p2), -4 * h * p3)
    return tuple(jnp.asarray(c).astype(dtype) for c in out)


class CachedCoefficients(eqx.Module):
    """``args`` of a fixed-step ETDRK4 solve: the viscosity and the step's coefficients, built once per solve.

    Passed as ``args`` (not solver state) so they are closed over by the time loop instead of being carried
    and checkpointed at every step.  ``recheck`` (set when save times split some steps) makes every step
    compare its size with ``h`` and rebuild the coefficients when they differ; otherwise all steps have size
    ``h`` up to rounding of the accumulated time.

    ``dcoeffs`` (with ``recheck``): the derivatives of ``coeffs`` with respect to the step size at ``h``.  A step
    whose size equals ``h`` in value need not move with ``h`` under differentiation: one that ends on a save time
    lying on the lattice ``k h`` (the save time is fixed, the lattice moves with ``t1``).  The cached coefficients
    of such a step carry the tangent ``dcoeffs * d(size - h)``, so that their derivative is that of the step's own
    size (the value is unchanged).
    """

    nu: Array
    h: Array
    coeffs: tuple[Array, ...]
    recheck: bool = eqx.field(static=True, default=False)
    dcoeffs: tuple[Array, ...] | None = None


def viscosity(args) -> Array:
    """The viscosity inside ``args`` (plain nu, or :class:`CachedCoefficients`)."""
    return args.nu if isinstance(args, CachedCoefficients) else args


def _unwrap(terms):
    while not isinstance(terms, SemilinearTerm):  # diffrax wraps terms (direction of integration)
        terms = terms.term
    return terms


class ETDRK4(dfx.AbstractAdaptiveSolver):
    """Cox-Matthews ETDRK4 with an embedded stiffly-second-order estimate, for :class:`SemilinearTerm`.

    Order 4 (error-estimate order 3).  Four nonlinear evaluations per step.  Use with
    ``diffrax.PIDController``; linear interpolation between steps for dense output.

    Fixed steps (``diffrax.ConstantStepSize``, as :func:`solve_burgers` with ``dt=`` sets it up): pass
    ``args=CachedCoefficients(nu, h, etdrk4_coefficients(...))`` and every step reuses the phi-function
    coefficients built once for the step size ``h`` (no error estimate is formed then).
    """

    term_structure: ClassVar = SemilinearTerm
    interpolation_cls: ClassVar = dfx.LocalLinearInterpolation

    def order(self, terms):
        return 4

    def error_order(self, terms):
        return 3

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump
        terms = _unwrap(terms)
        h = t1 - t0
        yh = terms.forward(y0)
        cdt = yh.dtype  # strict promotion: the real coefficients multiply complex spectra
        cached = isinstance(args, CachedCoefficients)
        if not cached:
            coeffs = etdrk4_coefficients(terms.linear(args), h, cdt)
        elif args.recheck:
            # a step split by a save time has another size: rebuild its coefficients
            tol = 256 * jnp.finfo(h.dtype).eps * (jnp.abs(t0) + jnp.abs(t1))

            def cached():
                if args.dcoeffs is None:
                    return args.coeffs
                # value: the cached coefficients exactly (x - stop_gradient(x) is 0); derivative: that of this step's
                # own size.  A step onto a save time on the lattice has the size h in value, but the save time is
                # fixed while h = t1 / ceil(t1 / dt) moves with t1: read as size h, d y(ts) / d t1 came out 0.91
                # where it is 0 (the solution at a fixed time does not depend on t1)
                dh = (h - args.h) - jax.lax.stop_gradient(h - args.h)
                return tuple(c + dc * dh.astype(c.dtype) for c, dc in zip(args.coeffs, args.dcoeffs))

            coeffs = jax.lax.cond(jnp.abs(h - args.h) <= tol, cached,
                                  lambda: etdrk4_coefficients(terms.linear(args), h, cdt))
        else:
            coeffs = args.coeffs
        e, e2, q, fa, fb, fc, g = coeffs
        n0 = terms.nonlinear(yh, args)
        a = e2 * yh + q * n0
        na = terms.nonlinear(a, args)
        b = e2 * yh + q * na
        nb = terms.nonlinear(b, args)
        c = e2 * a + q * (2 * nb - n0)
        nc = terms.nonlinear(c, args)
        eyh = e * yh
        y1h = eyh + fa * n0 + fb * (na + nb) + fc * nc
        y1 = terms.inverse(y1h).astype(y0.dtype)
        if cached:
            err = None
        else:
            err = terms.inverse(fc * (n0 + nc) + g * na + fb * nb).astype(y0.dtype)
        return y1, err, dict(y0=y0, y1=y1), solver_state, dfx.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)
