"""Translation of softmax logits (THEORY section 1, "translation")."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._tree import Path
from ._base import Group, SymmetryError, as_path, common_float


class Translation(Group):
    """Shift every softmax logit by the same amount: ``b -> b + c 1``, ``W[i, :] -> W[i, :] + a_i 1``.

    ``kernel`` has shape ``(h, C)`` (logits ``= h_in @ W + b``), ``bias`` shape ``(C,)`` (or ``None``).
    The group is ``R x R^h`` (additive); element ``{"a": (h,), "c": ()}``.  Orbit tangents are the constant
    rows, so the vertical projection subtracts row means (closed form, Gram matrix ``C I``).
    Charges (linear, conserved because softmax cross-entropy gradients sum to zero over classes):
    ``S_i = sum_k W[i, k]`` and ``S_b = sum_k b_k``; decoupled weight decay gives ``S+ = (1 - eta lam) S``.
    Canonical representative and invariants: the class-centred ``W`` and ``b``.
    """

    kernel: Path = eqx.field(static=True)
    bias: Path | None = eqx.field(static=True)

    charge_linear: ClassVar[bool] = True
    shift_action: ClassVar[bool] = True
    canonical_kind: ClassVar[str] = "min_norm"

    def __init__(self, kernel, bias=None, name: str = "translation"):
        self.name = name
        try:
            self.kernel = as_path(kernel)
            self.bias = None if bias is None else as_path(bias)
        except TypeError:
            raise SymmetryError(f"Translation {name!r}: kernel and bias must be parameter paths (bias may be None), "
                                f"got kernel={kernel!r}, bias={bias!r}") from None

    def paths(self):
        return (self.kernel,) + ((self.bias,) if self.bias is not None else ())

    def _check(self, flat):
        super()._check(flat)
        if flat[self.kernel].ndim != 2:
            raise SymmetryError(f"Translation {self.name!r}: kernel must be (h, C), got {flat[self.kernel].shape}")
        if self.bias is not None and flat[self.bias].shape != flat[self.kernel].shape[1:]:
            raise SymmetryError(f"Translation {self.name!r}: bias must be (C,) = {flat[self.kernel].shape[1:]} like "
                                f"the kernel's classes, got {flat[self.bias].shape}")

    def _h(self, flat):
        return flat[self.kernel].shape[0]

    def _C(self, flat):
        return flat[self.kernel].shape[1]

    def _sample(self, key, flat, scale):
        k1, k2 = jax.random.split(key)
        dt = flat[self.kernel].dtype
        return {"a": 2.0 * scale * jax.random.normal(k1, (self._h(flat),), dt),
                "c": 2.0 * scale * jax.random.normal(k2, (), dt)}

    def _identity(self, flat):
        dt = flat[self.kernel].dtype
        return {"a": jnp.zeros((self._h(flat),), dt), "c": jnp.zeros((), dt)}

    def _act(self, g, flat):
        out = dict(flat)
        # (an element of another float width, sampled at float64 parameters, is read in the parameters' dtypes)
        out[self.kernel] = flat[self.kernel] + g["a"][:, None].astype(flat[self.kernel].dtype)
        if self.bias is not None:
            out[self.bias] = flat[self.bias] + g["c"].astype(flat[self.bias].dtype)
        return out

    def _inverse(self, g):
        return jax.tree.map(jnp.negative, g)

    def _cotransport(self, g, cot):
        # a shift: its Jacobian is the identity
        return dict(cot)

    def _compose(self, g, h):
        return jax.tree.map(jnp.add, *common_float(g, h))  # (elements of two float widths: their common dtype)

    def _exp(self, xi):
        return {"a": xi["a"], "c": xi["c"] if "c" in xi else jnp.zeros((), xi["a"].dtype)}

    def _algebra_zeros(self, flat):
        z = self._identity(flat)
        return z if self.bias is not None else {"a": z["a"]}

    def _tmap(self, flat, xi):
        W = flat[self.kernel]
        out = {self.kernel: jnp.broadcast_to(xi["a"][:, None], W.shape)}
        if self.bias is not None:
            out[self.bias] = jnp.broadcast_to(xi["c"], flat[self.bias].shape)
        return out

    def _tmap_T(self, flat, v):
        out = {"a": jnp.sum(v[self.kernel], axis=1)}
        if self.bias is not None:
            out["c"] = jnp.sum(v[self.bias])
        return out

    def _gram_diag(self, flat):
        return jax.tree.map(lambda x: jnp.full_like(x, self._C(flat)), self._algebra_zeros(flat))

    def _vcoeffs(self, flat, v):
        return jax.tree.map(lambda x: x / self._C(flat), self._tmap_T(flat, v))

    def _canonical_element(self, flat):
        g = {"a": -jnp.mean(flat[self.kernel], axis=1), "c": jnp.zeros((), flat[self.kernel].dtype)}
        if self.bias is not None:
            g["c"] = -jnp.mean(flat[self.bias])
        return g

    def _invariants(self, flat):
        can = self._act(self._canonical_element(flat), flat)
        return {"kernel": can[self.kernel]} | ({"bias": can[self.bias]} if self.bias is not None else {})

    def _charges(self, flat):
        out = {"kernel": jnp.sum(flat[self.kernel], axis=1)}
        if self.bias is not None:
            out["bias"] = jnp.sum(flat[self.bias])
        return out
