"""A small convolutional network with optional normalisation, and its symmetries (THEORY section 1)."""

from __future__ import annotations

from typing import Sequence

import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from .. import _tree
from ..symmetry import Permutation, Product, Rescale, Scale, Translation
from ._activations import check_activation, get_activation, is_homogeneous
from ._checks import (
    as_real_input,
    as_size,
    check_classes,
    check_eps,
    check_flag,
    check_param_dtype,
    check_rngs,
    check_sizes,
    check_widths,
)
from ._init import lecun_normal
from ._norm import NORM_EPS, BatchNorm, LayerNorm

NORMS = (None, "layer", "batch")


CONV_IMPLS = ("auto", "patches", "xla")


def conv_same_patches(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, stride: int = 1) -> jax.Array:
    """A ``SAME``-padded 2-D convolution (NHWC input, HWIO kernel, XLA's padding convention) as a sum over the
    ``k x k`` shifted, strided slices of the padded input contracted with the kernel (im2col): no convolution
    op in the forward or backward pass.  On XLA:CPU a convolution inside a loop body (a training
    ``lax.scan``) runs many times slower than outside one (jax issue 12868); this form does not."""
    kh, kw = kernel.shape[:2]
    n, h, w, _ = x.shape
    ho, wo = -(-h // stride), -(-w // stride)
    ph = max((ho - 1) * stride + kh - h, 0)
    pw = max((wo - 1) * stride + kw - w, 0)
    xp = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    patches = jnp.stack([
        jax.lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, xp.shape[3]),
                      (1, stride, stride, 1))
        for i in range(kh) for j in range(kw)
    ], axis=3)
    out = jnp.einsum("nhwpc,pco->nhwo", patches, kernel.reshape(kh * kw, *kernel.shape[2:]))
    return out if bias is None else out + bias[None, None, None, :]


class CNN(nnx.Module):
    """``conv -> [norm] -> sigma`` blocks, global average pooling, and a linear head; inputs NHWC.

    Block ``l``: ``z = conv_l(h)`` (kernel ``(k, k, c_l, c_{l+1})``, ``SAME`` padding, stride ``strides[l]``),
    then ``norm_l(z)`` when ``norm`` is set, then the activation.  The head maps the spatially averaged last
    feature map ``(N, c_L)`` to ``(N, dout)``.  Works for any image size (8x8 digits, 28x28 MNIST-like).

    Args:
        in_channels: input channels (1 for grey-scale images).
        channels: output channels of each conv layer, e.g. ``(8, 16)``.
        dout: output dimension (number of classes).
        kernel_size: square kernel size.
        conv_impl: ``"patches"`` (shifted slices contracted with the kernel, :func:`conv_same_patches`),
            ``"xla"`` (``nnx.Conv``, XLA's convolution) or ``"auto"`` (default: patches on CPU, where XLA's
            convolution inside a training loop is many times slower, XLA's elsewhere).  Same parameters and
            the same function either way (to float rounding).
        strides: one stride for every layer, or one per layer.
        norm: ``None``; ``"layer"`` (:class:`LayerNorm` over the channels at each position, so every layer needs
            at least 2 channels, and should have 3: over two channels the norm outputs ``+-(scale_0, -scale_1) +
            bias``, a function of one sign per position, so the parameters before it get no gradient; a
            ``UserWarning`` says so); or ``"batch"``
            (:class:`BatchNorm` per channel over batch and space, with running statistics as ``nnx.BatchStat``
            state, ``model.train()`` / ``model.eval()``).  With ``"batch"`` the convs have no bias (the batch
            mean would cancel it).
        activation: as for :class:`~quotient_sgd.models.MLP` (default ``"relu"``).
        classifier: ``False`` (default) returns the head output ``z``; ``True`` returns ``log_softmax(z)`` and
            declares the softmax-logit translation (see :class:`~quotient_sgd.models.MLP`).
        norm_eps: epsilon inside the normalisation variance (default ``NORM_EPS = 1e-12``, so that the scale
            symmetry is exact to float rounding).
        param_dtype: parameter dtype (inputs are cast to it).
        rngs: ``nnx.Rngs``.

    Parameter paths: ``("convs", l, "kernel")`` ``(k, k, c_l, c_{l+1})``, ``("convs", l, "bias")`` ``(c_{l+1},)``
    (absent with ``norm="batch"``), ``("norms", l, "scale" | "bias")`` ``(c_{l+1},)`` when ``norm`` is set,
    ``("head", "kernel")`` ``(c_L, dout)``, ``("head", "bias")`` ``(dout,)``.  Batch statistics (not ``Param``):
    ``("norms", l, "mean" | "var")``.

    Example:
        >>> model = CNN(1, (4, 8), 10, norm="batch", classifier=True, rngs=nnx.Rngs(0))
        >>> model(jnp.ones((2, 8, 8, 1))).shape
        (2, 10)
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        dout: int,
        *,
        kernel_size: int = 3,
        strides: int | Sequence[int] = 1,
        norm: str | None = None,
        activation: str = "relu",
        classifier: bool = False,
        norm_eps: float = NORM_EPS,
        conv_impl: str = "auto",
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {list(CONV_IMPLS)}, got {conv_impl!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
        in_channels, dout, kernel_size = check_sizes("CNN", in_channels=in_channels, dout=dout, kernel_size=kernel_size)
        classifier = check_flag("CNN", "classifier", classifier)
        check_classes("CNN", "dout", dout, classifier)
        channels = check_widths("CNN", "channels", channels, allow_empty=False)
        if norm == "layer" and min(channels) < 2:
            raise ValueError(f"CNN: norm='layer' needs at least 2 channels in every conv layer, got channels="
                             f"{channels}: a LayerNorm over one channel outputs its bias alone, so the output would "
                             f"not depend on x (use norm='batch' or None, or wider layers)")
        if norm == "layer" and 2 in channels:
            # (a warning, not a refusal: such layers still compute a function of x, through one sign per position)
            warnings.warn(f"CNN: norm='layer' over a conv layer of 2 channels (channels={channels}): a LayerNorm "
                          f"over two features outputs +-(scale_0, -scale_1) + bias, a function of the sign of their "
                          f"difference alone, so the parameters before it get no gradient (measured: 5e-7 for the "
                          f"conv of a 2-channel layer against 1.4 with 3 channels) and are flat directions of every "
                          f"loss that the declared symmetries do not account for; use at least 3 channels with "
                          f"norm='layer'", UserWarning, stacklevel=2)
        # one stride (also a 0-d NumPy / JAX integer, which has __iter__ but no items) or one per layer
        one = (not hasattr(strides, "__iter__") or isinstance(strides, (str, bytes))
               or getattr(strides, "ndim", None) == 0)
        try:
            seq = (strides,) * len(channels) if one else tuple(strides)
            seq = tuple(as_size("CNN", "strides", s) for s in seq) if len(seq) == len(channels) else None
        except (TypeError, ValueError):
            seq = None
        if seq is None:
            raise ValueError(f"CNN: strides must be an integer >= 1 or one such integer per conv layer "
                             f"({len(channels)}), got {strides!r}")
        strides = seq
        norm_eps = check_eps("CNN", "norm_eps", norm_eps)
        param_dtype = check_param_dtype("CNN", param_dtype)
        check_rngs("CNN", rngs)
        self.activation = check_activation(activation)
        self.conv_impl = conv_impl
        self.strides = strides
        self.norm = norm
        self.classifier = classifier
        sizes = (in_channels, *channels)
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, (kernel_size, kernel_size), strides=s, padding="SAME", use_bias=norm != "batch",
                         kernel_init=lecun_normal(), param_dtype=param_dtype, rngs=rngs)
                for a, b, s in zip(sizes[:-1], sizes[1:], strides)
            ]
        )
        if norm == "layer":
            self.norms = nnx.List([LayerNorm(c, eps=norm_eps, param_dtype=param_dtype) for c in channels])
        elif norm == "batch":
            self.norms = nnx.List([BatchNorm(c, eps=norm_eps, param_dtype=param_dtype) for c in channels])
        self.head = nnx.Linear(channels[-1], dout, kernel_init=lecun_normal(), param_dtype=param_dtype, rngs=rngs)

    def logits(self, x: jax.Array) -> jax.Array:
        """The head output ``z`` (before any ``log_softmax``), shape ``(N, dout)``; ``x`` is ``(N, H, W, C)``."""
        act = get_activation(self.activation)
        h = as_real_input("CNN", x, self.head.kernel[...].dtype)
        c_in = self.convs[0].kernel[...].shape[2]
        if h.ndim != 4 or h.shape[-1] != c_in:
            # the patch contraction (an einsum) would broadcast a single input channel over all c_in silently
            raise ValueError(f"CNN: x must be (N, H, W, in_channels={c_in}) (NHWC), got shape {h.shape}")
        if not h.shape[1] or not h.shape[2]:
            # the global average pool of an empty image is 0 / 0: every output was NaN, silently
            raise ValueError(f"CNN: x must be images of at least one pixel, (N, H, W, {c_in}) with H, W >= 1, got "
                             f"shape {h.shape}")
        impl = self.conv_impl
        if impl == "auto":
            impl = "patches" if jax.default_backend() == "cpu" else "xla"
        for l, conv in enumerate(self.convs):
            if impl == "xla":
                h = conv(h)
            else:
                h = conv_same_patches(h, conv.kernel[...], None if conv.bias is None else conv.bias[...],
                                      self.strides[l])
            if self.norm is not None:
                h = self.norms[l](h)
            h = act(h)
        return self.head(jnp.mean(h, axis=(1, 2)))

    def __call__(self, x: jax.Array) -> jax.Array:
        z = self.logits(x)
        return jax.nn.log_softmax(z, axis=-1) if self.classifier else z

    def symmetries(self) -> Product:
        """The symmetry group this CNN's structure has (THEORY section 1).

        For each conv layer ``l`` (channels ``c_{l+1}``), with ``next`` = ``(convs.{l+1}.kernel, axis 2)`` or,
        for the last layer, ``(head.kernel, axis 0)`` (global average pooling is linear, so it commutes with
        per-channel factors and with channel permutations):

        - ``norm=None``: ``"rescale/convs.{l}"`` (positively homogeneous activation only): conv kernel (axis 3)
          and bias times ``a``, ``next`` divided by ``a``, per channel.
        - ``norm="layer"``: ``"scale/convs.{l}"``: ``Scale`` of the whole conv kernel and bias as *one* block
          (the LayerNorm over channels is invariant under one common factor, not per-channel ones);
          ``"rescale/norms.{l}"`` (homogeneous activation only): the LayerNorm's ``scale`` and ``bias``
          (``gamma``, ``beta``) times ``a`` per channel, ``next`` divided by ``a``: ``gamma n + beta`` feeds the
          activation directly.  A rescale *across* the normalisation (conv kernel vs ``next``) is not a symmetry.
        - ``norm="batch"``: ``"scale/convs.{l}"``: ``Scale`` per output channel of the conv kernel (axis 3;
          batch normalisation is per channel); ``"rescale/norms.{l}"`` as for ``"layer"``.  These hold for the
          training-mode function (batch statistics); in evaluation mode the running statistics have to be
          transformed too (they are state, not parameters): :meth:`act_on_batch_stats`.
        - always ``"permutation/convs.{l}"``: the channels, permuted in the conv kernel (axis 3) and bias, the
          norm's ``scale`` / ``bias``, and ``next``; exact for every elementwise activation (also in evaluation
          mode only if the running statistics are permuted alongside).

        and ``"translation/head"`` when ``classifier=True``.

        The declared group is a subgroup of the model's symmetries, not all of them; not declared (so not in the
        vertical space, canonical points or invariants): for ``activation="tanh"`` (odd) the sign flip of a
        channel (its conv kernel slice and bias, or with a norm the norm's ``scale`` and ``bias`` entry, negated
        with ``next``'s input slice; discrete), and for ``activation="identity"`` with ``norm=None`` the whole
        ``GL(c_{l+1})`` of a layer's channels (conv kernel and bias times ``A`` on the output-channel axis,
        ``next`` times ``A^{-1}`` on its input-channel axis: convolution and pooling are linear in the channels).
        """
        comps = []
        hom = is_homogeneous(self.activation)
        L = len(self.convs)
        for l in range(L):
            k, b = ("convs", l, "kernel"), ("convs", l, "bias")
            nxt = (("convs", l + 1, "kernel"), 2) if l + 1 < L else (("head", "kernel"), 0)
            units = [(k, 3)] + ([(b, 0)] if self.norm != "batch" else [])
            if self.norm is None:
                if hom:
                    comps.append(Rescale(incoming=tuple(units), outgoing=(nxt,), name=f"rescale/convs.{l}"))
            else:
                gamma, beta = ("norms", l, "scale"), ("norms", l, "bias")
                if self.norm == "layer":
                    comps.append(Scale(members=((k, None), (b, None)), name=f"scale/convs.{l}"))
                else:
                    comps.append(Scale(members=((k, 3),), name=f"scale/convs.{l}"))
                if hom:
                    comps.append(Rescale(incoming=((gamma, 0), (beta, 0)), outgoing=(nxt,), name=f"rescale/norms.{l}"))
                units += [(gamma, 0), (beta, 0)]
            comps.append(Permutation(members=tuple(units) + (nxt,), name=f"permutation/convs.{l}"))
        if self.classifier:
            comps.append(Translation(kernel=("head", "kernel"), bias=("head", "bias"), name="translation/head"))
        return Product(comps, name="CNN")

    def act_on_batch_stats(self, group: Product, g, state):
        """The BatchNorm running statistics that go with the parameters moved by ``g``, an element (a ``Word``) of
        ``group``, a :class:`Product` of components of :meth:`symmetries`: with them the evaluation-mode function
        of ``(g . params, state')`` equals that of ``(params, state)``.

        ``state``: the model's non-parameter state (``nnx.split(model, nnx.Param, ...)[2]``).  The word's elements
        act in order, as on the parameters.  ``"scale/convs.{l}"`` multiplies output channel ``k`` of conv ``l``,
        the input of ``norms.{l}``, by ``c_k = exp(xi_k)``: the running mean becomes ``c_k mean_k`` and the
        running variance ``c_k^2 var_k`` (the normalised value ``(z - mean) / sqrt(var + eps)`` is then unchanged
        up to ``eps``, as in training mode).  ``"permutation/convs.{l}"`` reorders the channels of conv ``l`` and
        of ``norms.{l}``: the running statistics are reordered with them (exactly).  ``"rescale/norms.{l}"``
        scales the norm's output and divides the next layer's input weights (exact through a homogeneous
        activation) and ``"translation/head"`` acts after the last norm: neither touches the statistics.  This is
        what :func:`quotient_sgd.optim.train` needs as ``act_on_model_state`` for ``gauge_fix``, whose canonical
        elements include the permutations: ``functools.partial(model.act_on_batch_stats, group)``."""
        if self.norm != "batch":
            return state
        if not isinstance(group, Product):
            # (a component passed for the group failed with a bare AttributeError: no attribute 'components')
            raise TypeError(f"act_on_batch_stats: group must be a Product of components of model.symmetries() (the "
                            f"group g was taken from), got {type(group).__name__}")
        group._check_word(g)  # (TypeError naming the Word for an element of a component: a bare AttributeError)
        leaves, treedef = _tree.flatten(state)
        flat: dict[int, dict] = {}  # layer -> {"mean": ..., "var": ...}
        for path, x in leaves.items():
            if len(path) == 3 and path[0] == "norms" and path[2] in ("mean", "var"):
                flat.setdefault(int(path[1]), {})[path[2]] = x
        missing = [("norms", l, k) for l in range(len(self.convs)) for k in ("mean", "var") if k not in flat.get(l, {})]
        if missing:
            # (the parameters, nnx.split(model, nnx.Param, ...)[1], passed for the state: returned unchanged, so the
            # statistics of the moved parameters were silently those of the old ones)
            raise ValueError(f"act_on_batch_stats: state has no running statistic at {missing[0]!r} (paths "
                             f"{[tuple(p) for p in leaves][:6]}); pass the model's non-parameter state, "
                             f"nnx.split(model, nnx.Param, ...)[2], which holds ('norms', l, 'mean' | 'var') for "
                             f"every conv layer l")
        for i, e in zip(g.indices, g.elements):
            comp = group.components[i]
            kind = comp.name.split("/")[0]
            if isinstance(comp, Scale) and comp.per_channel and kind == "scale":
                (path, axis), = comp.members
                if path[0] != "convs" or path[2] != "kernel" or axis != 3:
                    raise ValueError(f"act_on_batch_stats: unexpected scale component {comp.name!r}")
                l = int(path[1])
                if l in flat:
                    c = jnp.exp(e)
                    flat[l] = {"mean": flat[l]["mean"] * c.astype(flat[l]["mean"].dtype),
                               "var": flat[l]["var"] * (c * c).astype(flat[l]["var"].dtype)}
            elif isinstance(comp, Permutation):
                (path, axis) = comp.members[0]
                if path[0] != "convs" or path[2] != "kernel" or axis != 3:
                    raise ValueError(f"act_on_batch_stats: unexpected permutation component {comp.name!r}")
                l = int(path[1])
                if l in flat:
                    flat[l] = {k: jnp.take(v, e, axis=0) for k, v in flat[l].items()}
            elif isinstance(comp, (Rescale, Translation)):
                continue
            else:
                raise ValueError(f"act_on_batch_stats: the action of {comp.name!r} on the running statistics is not "
                                 f"implemented (only the components of a BatchNorm CNN's symmetries are)")

        for path in leaves:
            if len(path) == 3 and path[0] == "norms" and path[2] in ("mean", "var"):
                leaves[path] = flat[int(path[1])][path[2]]
        return _tree.unflatten(leaves, treedef)
