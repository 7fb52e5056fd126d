"""Shape aliases (jaxtyping) shared by the HJ engine."""

from __future__ import annotations

from jaxtyping import Array, ArrayLike, Float

Field = Float[Array, "..."]
"""A field on a grid: ``(n,)`` in 1-D, ``(nx, ny)`` (value) or ``(2, nx, ny)`` (gradient) in 2-D."""
Scalar = Float[ArrayLike, ""]

__all__ = ["Array", "ArrayLike", "Field", "Scalar"]
