"""Uniform grids for the HJ / Burgers engine (THEORY section 3).

A periodic grid on ``[lo, hi)`` has ``n`` nodes ``x_i = lo + i * dx`` with ``dx = (hi - lo) / n``: the Fourier
pseudo-spectral scheme reads them as collocation points, the finite-volume scheme as cell centres (the two
readings differ by O(dx^2), inside the second-order accuracy of the FV scheme).

A bounded (``periodic=False``) grid on ``[lo, hi]`` has ``n`` nodes including both ends, ``dx = (hi - lo) /
(n - 1)``.  Only the finite-volume scheme runs on it; its ghost cells continue the last samples' trend
(linear for a gradient field p, quadratic for a value field u: the loss is continued by its local quadratic
model).  Any boundary treatment is wrong where characteristics enter the domain, so loss slices
(:func:`quotient_sgd.hj.slice_flow`) sample the loss on a margin beyond the slice ends and crop it off; see
there.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._custom_types import Array


def _float_dtype():
    return jnp.zeros((), dtype=float).dtype  # float32, or float64 under jax_enable_x64


def widen_real(x) -> Array:
    """``x`` as a float array in the precision the engine computes in: integer and boolean values in the default
    float, half precision (bfloat16, float16) in float32 (the FFTs, the quadrature's log-sum-exp and Diffrax's
    step-size controllers need >= 32 bits); float32 / float64 as they are."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(_float_dtype())
    return x.astype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else x


def real_field(name: str, arg: str, x) -> Array:
    """A field ``x`` given to ``name`` as argument ``arg``: refused by name (``TypeError``) when complex or not numbers
    at all (a string, ``None``: JAX's own "not a valid JAX array type" / "None is not a valid value for jnp.array"
    named neither the function nor the argument), else :func:`widen_real`."""
    given = x
    try:
        x = jnp.asarray(x)
    except (TypeError, ValueError):
        x = None
    if x is None or not (jnp.issubdtype(x.dtype, jnp.number) or x.dtype == jnp.bool_):
        raise TypeError(f"{name}: {arg}={_short(given)} is not allowed; need a real array of numbers (float32 or "
                        "float64; integer and boolean ones are read in the default float).")
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"{name}: {arg} has dtype {x.dtype}; the field must be real (float32 or float64).")
    return widen_real(x)


def _short(value) -> str:
    """``repr(value)``, cut to 60 characters (an error message names a bad argument without printing a whole array)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _real_number(value) -> float | None:
    """``value`` as a float when it is a real number (a Python or NumPy int or float, or a concrete 0-d array of
    one); ``None`` for anything else: a bool, a string, bytes, a complex number, ``None``, another shape."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        return None
    try:
        a = np.asarray(value)
    except Exception:  # noqa: BLE001 - traced, or not array-like
        return None
    if a.ndim != 0 or a.dtype.kind not in "iuf":
        return None
    return float(a)


def is_count(value, low: int) -> bool:
    """``value`` is a whole real number ``>= low`` (``16.0`` counts; a bool, a string, ``None``, a complex number or a
    fraction does not)."""
    x = _real_number(value)
    return x is not None and float(x).is_integer() and x >= low


class Grid(eqx.Module):
    """A 1-D uniform grid.

    Example:
        >>> g = Grid(256, -1.0, 1.0)            # periodic [-1, 1)
        >>> g.x.shape, float(g.dx)
        ((256,), 0.0078125)
        >>> g2 = g * Grid(64, 0.0, 1.0)         # 2-D product, g2.x has shape (2, 256, 64)
    """

    n: int = eqx.field(static=True)
    lo: float = eqx.field(static=True)
    hi: float = eqx.field(static=True)
    periodic: bool = eqx.field(static=True, default=True)

    def __init__(self, n: int, lo: float, hi: float, *, periodic: bool = True):
        # a string ("-1"), bytes or a bool (False, True: the grid [0, 1)) was read as the number float() makes of
        # it; a complex or None end failed in a bare float() TypeError, and n="16" was reported as "got n=16"
        count = _real_number(n)
        if count is None or not float(count).is_integer() or count < 4:
            raise ValueError(f"Grid needs an integer n >= 4 points, got n={n!r}.")
        ends = (_real_number(lo), _real_number(hi))
        if any(e is None for e in ends) or not (np.isfinite(ends[0]) and np.isfinite(ends[1]) and ends[1] > ends[0]):
            raise ValueError(f"Grid needs finite lo < hi (real numbers), got lo={lo!r}, hi={hi!r}.")
        lo, hi = ends
        if not isinstance(periodic, (bool, np.bool_)):
            # bool("no") is True: a string or a number would have chosen the boundary by its truth value
            raise ValueError(f"Grid: periodic={periodic!r} is not allowed; need True (periodic [lo, hi)) or False "
                             "(bounded [lo, hi]).")
        self.n = int(n)
        self.lo = float(lo)
        self.hi = float(hi)
        self.periodic = bool(periodic)

    ndim = 1

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n,)

    @property
    def length(self) -> float:
        return self.hi - self.lo

    @property
    def dx(self) -> float:
        return self.length / (self.n if self.periodic else self.n - 1)

    @property
    def x(self) -> Array:
        dtype = _float_dtype()
        return jnp.asarray(self.lo + self.dx * np.arange(self.n), dtype=dtype)

    def _need_periodic(self, what: str) -> None:
        # on a bounded grid the n samples span (n - 1) dx = length, not one period n dx: k = 2 pi m / length were
        # not the wavenumbers of the samples' FFT (off by the factor n / (n - 1)), and no Fourier series holds there
        if not self.periodic:
            raise ValueError(f"Grid.{what}: the grid is bounded (periodic=False); Fourier modes need a periodic grid, "
                             "Grid(n, lo, hi) (the spectral scheme runs only there).")

    def wavenumbers(self, *, real: bool = False) -> Array:
        """Angular wavenumbers ``k`` of ``fft`` (or ``rfft`` if ``real``) on this periodic grid (a bounded grid is
        refused with a ``ValueError``)."""
        self._need_periodic("wavenumbers")
        freq = np.fft.rfftfreq(self.n) if real else np.fft.fftfreq(self.n)
        return jnp.asarray(2 * np.pi / self.length * self.n * freq, dtype=_float_dtype())

    def index_frequencies(self, *, real: bool = False) -> np.ndarray:
        """Integer mode numbers m (``k = 2 pi m / length``) on this periodic grid (a bounded grid is refused with a
        ``ValueError``)."""
        self._need_periodic("index_frequencies")
        return np.rint(self.n * (np.fft.rfftfreq(self.n) if real else np.fft.fftfreq(self.n)))

    def __mul__(self, other: "Grid") -> "Grid2D":
        return Grid2D(self, other)


class Grid2D(eqx.Module):
    """Tensor product of two 1-D grids; ``x`` has shape ``(2, nx, ny)`` ("ij" indexing).

    A value field u lives on shape ``(nx, ny)``; a gradient field p = grad u on ``(2, nx, ny)``.
    """

    gx: Grid
    gy: Grid

    ndim = 2

    def __check_init__(self):
        for name in ("gx", "gy"):
            if not isinstance(getattr(self, name), Grid):
                raise ValueError(f"Grid2D: {name} must be a 1-D Grid, e.g. Grid(64, -1.0, 1.0), got "
                                 f"{getattr(self, name)!r}")

    @property
    def periodic(self) -> bool:
        return self.gx.periodic and self.gy.periodic

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.gx.n, self.gy.n)

    @property
    def dx(self) -> tuple[float, float]:
        return (self.gx.dx, self.gy.dx)

    @property
    def axes(self) -> tuple[Grid, Grid]:
        return (self.gx, self.gy)

    @property
    def x(self) -> Array:
        xx, yy = jnp.meshgrid(self.gx.x, self.gy.x, indexing="ij")
        return jnp.stack([xx, yy])


AnyGrid = Grid | Grid2D
