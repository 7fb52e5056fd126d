"""Multilayer perceptrons and deep linear networks, with the symmetries their structure has (THEORY section 1)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ..symmetry import GL, Permutation, Product, Rescale, Translation
from ._activations import check_activation, get_activation, is_homogeneous
from ._checks import (
    check_classes,
    check_flag,
    check_input,
    check_param_dtype,
    check_rngs,
    check_sizes,
    check_widths,
)
from ._init import lecun_normal


def _kernel(layer: nnx.Linear) -> jax.Array:
    return layer.kernel[...]


class MLP(nnx.Module):
    """``f(x) = sigma(... sigma(x W_1 + b_1) ...) W_L + b_L`` with ``Linear`` kernels ``(din, dout)``.

    Args:
        din: input dimension.
        hidden: widths of the hidden layers (may be empty: a linear model).
        dout: output dimension.
        activation: one of ``"relu"``, ``"leaky_relu"`` (slope 0.01), ``"identity"``, ``"tanh"``, ``"gelu"``.
        classifier: ``False`` (default: a regression / generic output) returns the last layer's output
            ``z``.  ``True`` returns the normalised log-probabilities ``log_softmax(z)``; they are valid logits
            for ``optax.softmax_cross_entropy`` and ``argmax``, and make the softmax-logit translation an exact
            symmetry of the output, so :meth:`symmetries` declares it.  ``logits(x)`` gives the raw ``z``.
        param_dtype: parameter dtype (inputs are cast to it).
        rngs: ``nnx.Rngs`` for the initialisation (lecun-normal kernels, zero biases; flax defaults).

    Parameter paths (``nnx.split(model, nnx.Param, ...)``): ``("layers", l, "kernel")`` of shape
    ``(d_l, d_{l+1})`` and ``("layers", l, "bias")`` of shape ``(d_{l+1},)``, ``l = 0 .. len(hidden)``.

    Example:
        >>> model = MLP(2, (8, 8), 1, activation="relu", rngs=nnx.Rngs(0))
        >>> model(jnp.ones((5, 2))).shape
        (5, 1)
    """

    def __init__(
        self,
        din: int,
        hidden: Sequence[int],
        dout: int,
        *,
        activation: str = "relu",
        classifier: bool = False,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.activation = check_activation(activation)
        din, dout = check_sizes("MLP", din=din, dout=dout)
        classifier = check_flag("MLP", "classifier", classifier)
        check_classes("MLP", "dout", dout, classifier)
        hidden = check_widths("MLP", "hidden", hidden)
        param_dtype = check_param_dtype("MLP", param_dtype)
        check_rngs("MLP", rngs)
        self.classifier = classifier
        sizes = (din, *tuple(hidden), dout)
        self.layers = nnx.List(
            [nnx.Linear(a, b, kernel_init=lecun_normal(), param_dtype=param_dtype, rngs=rngs)
             for a, b in zip(sizes[:-1], sizes[1:])]
        )

    def logits(self, x: jax.Array) -> jax.Array:
        """The last layer's output ``z`` (before any ``log_softmax``), shape ``(..., dout)``."""
        act = get_activation(self.activation)
        x = check_input("MLP", x, _kernel(self.layers[0]))
        for layer in self.layers[:-1]:
            x = act(layer(x))
        return self.layers[-1](x)

    def __call__(self, x: jax.Array) -> jax.Array:
        z = self.logits(x)
        return jax.nn.log_softmax(z, axis=-1) if self.classifier else z

    def symmetries(self) -> Product:
        """The symmetry group this MLP's structure has (THEORY section 1).

        Components, for each hidden layer ``l`` (the units output by ``layers[l]``):

        - ``"rescale/layers.{l}"`` (only for relu / leaky_relu / identity): ``Rescale`` with incoming
          ``(layers.l.kernel, axis 1)``, ``(layers.l.bias, axis 0)`` and outgoing ``(layers.{l+1}.kernel,
          axis 0)``; exact because ``sigma(a z) = a sigma(z)`` for ``a > 0``.  Not declared for tanh / GELU.
        - ``"permutation/layers.{l}"``: ``Permutation`` of the same units (kernel columns and bias entries of
          layer ``l``, kernel rows of layer ``l+1``); exact for every elementwise activation.

        and, when ``classifier=True``, ``"translation/layers.{L-1}"``: ``Translation`` of the last kernel rows and
        bias by constants over classes, which shifts every logit by the same amount and leaves
        ``log_softmax`` unchanged.

        Rescale and permutation of one layer overlap (act on the same arrays); :class:`Product` composes them as
        words.  The declared group is a subgroup of the model's symmetries, not all of them: for the identity
        activation the full ``GL(n)`` is a symmetry too (see :class:`DeepLinear`), and for tanh (an odd function) the
        sign flips ``w_in,j, b_j, w_out,j -> -w_in,j, -b_j, -w_out,j`` of each hidden unit are (discrete; not
        declared, so two networks that differ by them have different canonical points and invariants).
        """
        comps = []
        hom = is_homogeneous(self.activation)
        for l in range(len(self.layers) - 1):
            k, b, k_next = ("layers", l, "kernel"), ("layers", l, "bias"), ("layers", l + 1, "kernel")
            if hom:
                comps.append(Rescale(incoming=((k, 1), (b, 0)), outgoing=((k_next, 0),), name=f"rescale/layers.{l}"))
            comps.append(Permutation(members=((k, 1), (b, 0), (k_next, 0)), name=f"permutation/layers.{l}"))
        if self.classifier:
            last = len(self.layers) - 1
            comps.append(
                Translation(
                    kernel=("layers", last, "kernel"), bias=("layers", last, "bias"), name=f"translation/layers.{last}"
                )
            )
        return Product(comps, name="MLP")


class DeepLinear(nnx.Module):
    """A deep linear network ``f(x) = x W_1 W_2 ... W_L`` (identity activation, no biases).

    Its symmetry is ``GL(n_l)`` at every inner width (THEORY section 1, "linear"):
    ``W_l -> W_l A``, ``W_{l+1} -> A^{-1} W_{l+1}``; only the end-to-end product is a function of the orbit.

    Args:
        din, widths, dout: input dimension, inner widths, output dimension.
        param_dtype: parameter dtype (inputs are cast to it).
        rngs: ``nnx.Rngs``.

    Parameter paths: ``("layers", l, "kernel")`` of shape ``(d_l, d_{l+1})``.
    """

    def __init__(self, din: int, widths: Sequence[int], dout: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        din, dout = check_sizes("DeepLinear", din=din, dout=dout)
        sizes = (din, *check_widths("DeepLinear", "widths", widths), dout)
        param_dtype = check_param_dtype("DeepLinear", param_dtype)
        check_rngs("DeepLinear", rngs)
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, use_bias=False, kernel_init=lecun_normal(), param_dtype=param_dtype, rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:])
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = check_input("DeepLinear", x, _kernel(self.layers[0]))
        for layer in self.layers:
            x = layer(x)
        return x

    def symmetries(self) -> Product:
        """``"gl/layers.{l}"`` for every inner width: ``GL(kind="vo")`` with left ``layers.l.kernel``
        ``(d_l, n)`` and right ``layers.{l+1}.kernel`` ``(n, d_{l+2})``, no head axis.  Exact because the network
        depends on ``W_l W_{l+1}`` only through their product.  Neighbouring components overlap (share a kernel).
        """
        comps = [
            GL(left=(("layers", l, "kernel"), None), right=(("layers", l + 1, "kernel"), None), kind="vo",
               name=f"gl/layers.{l}")
            for l in range(len(self.layers) - 1)
        ]
        return Product(comps, name="DeepLinear")
