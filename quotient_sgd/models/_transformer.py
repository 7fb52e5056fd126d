"""A decoder-only pre-norm Transformer with explicit per-head attention parameters (THEORY section 1)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..symmetry import GL, Permutation, Product, Rescale, Translation
from ._activations import check_activation, get_activation, is_homogeneous
from ._checks import (
    as_real_input,
    check_classes,
    check_eps,
    check_flag,
    check_param_dtype,
    check_rngs,
    check_sizes,
)
from ._init import embed_init, lecun_normal, normal
from ._norm import NORM_EPS, LayerNorm


def _bias_heads(b: jax.Array) -> jax.Array:
    """``(H, d)`` head biases -> ``(1, H, 1, d)``, to add to ``(B, H, T, d)`` (explicit rank promotion)."""
    return b[None, :, None, :]


def _check_heads(model: str, d_model: int, num_heads: int) -> None:
    if d_model % num_heads:
        raise ValueError(f"{model}: d_model ({d_model}) must be divisible by num_heads ({num_heads}): "
                         f"d_head = d_model / num_heads must be an integer")


class CausalSelfAttention(nnx.Module):
    """Causal multi-head attention with the per-head matrices held explicitly.

    Params (``H`` heads, ``D = d_model``, ``d = d_head``): ``w_q, w_k, w_v`` ``(H, D, d)``, ``b_q, b_k, b_v``
    ``(H, d)``, ``w_o`` ``(H, d, D)``, ``b_o`` ``(D,)``.  Head ``h`` computes
    ``softmax_causal((x W_Q^h + b_Q^h)(x W_K^h + b_K^h)^T / sqrt(d)) (x W_V^h + b_V^h) W_O^h``; the heads are
    summed and ``b_o`` added.  The scores depend on ``(W_Q^h, b_Q^h)`` and ``(W_K^h, b_K^h)`` only through the
    bilinear form ``[W_Q; b_Q][W_K; b_K]^T``, the output on ``(W_V, b_V)`` and ``W_O`` only through
    ``[W_V; b_V] W_O`` (attention rows sum to one): the QK and VO ``GL(d)`` symmetries.

    Input ``x``: ``(..., T, d_model)`` real numbers, cast to the parameters' dtype: a batch ``(B, T, D)``, one
    sequence ``(T, D)`` or several batch axes; the output has ``x``'s shape.
    """

    def __init__(self, d_model: int, num_heads: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d_model, num_heads = check_sizes("CausalSelfAttention", d_model=d_model, num_heads=num_heads)
        _check_heads("CausalSelfAttention", d_model, num_heads)
        param_dtype = check_param_dtype("CausalSelfAttention", param_dtype)
        check_rngs("CausalSelfAttention", rngs)
        H, D, d = num_heads, d_model, d_model // num_heads
        self.num_heads, self.d_head = H, d
        init = normal(stddev=1.0 / math.sqrt(D))
        init_o = normal(stddev=1.0 / math.sqrt(H * d))
        self.w_q = nnx.Param(init(rngs.params(), (H, D, d), param_dtype))
        self.w_k = nnx.Param(init(rngs.params(), (H, D, d), param_dtype))
        self.w_v = nnx.Param(init(rngs.params(), (H, D, d), param_dtype))
        self.w_o = nnx.Param(init_o(rngs.params(), (H, d, D), param_dtype))
        self.b_q = nnx.Param(jnp.zeros((H, d), param_dtype))
        self.b_k = nnx.Param(jnp.zeros((H, d), param_dtype))
        self.b_v = nnx.Param(jnp.zeros((H, d), param_dtype))
        self.b_o = nnx.Param(jnp.zeros((D,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # the einsums below read (B, T, D) in the parameters' dtype: another shape failed in an einsum, another dtype
        # under strict promotion, naming neither the layer nor x
        x = as_real_input("CausalSelfAttention", x, self.w_q[...].dtype)
        D = self.w_q[...].shape[1]
        if x.ndim < 2 or x.shape[-1] != D:
            raise ValueError(f"CausalSelfAttention: x must be (..., T, d_model={D}): a batch (B, T, {D}) or one "
                             f"sequence (T, {D}); got shape {x.shape}")
        if x.ndim != 3:
            lead = x.shape[:-2]
            return self(x.reshape(math.prod(lead), *x.shape[-2:])).reshape(x.shape)
        T = x.shape[1]
        q = jnp.einsum("btD,hDd->bhtd", x, self.w_q[...]) + _bias_heads(self.b_q[...])
        k = jnp.einsum("btD,hDd->bhtd", x, self.w_k[...]) + _bias_heads(self.b_k[...])
        v = jnp.einsum("btD,hDd->bhtd", x, self.w_v[...]) + _bias_heads(self.b_v[...])
        s = jnp.einsum("bhtd,bhsd->bhts", q, k) / jnp.asarray(math.sqrt(self.d_head), x.dtype)
        causal = jnp.tril(jnp.ones((T, T), dtype=bool))[None, None, :, :]
        s = jnp.where(causal, s, jnp.asarray(jnp.finfo(s.dtype).min, s.dtype))
        a = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("bhts,bhsd->bhtd", a, v)
        return jnp.einsum("bhtd,hdD->btD", o, self.w_o[...]) + self.b_o[...][None, None, :]


class Block(nnx.Module):
    """Pre-norm block: ``x + attn(ln1(x))``, then ``x + fc_out(sigma(fc_in(ln2(x))))``."""

    def __init__(self, d_model, num_heads, *, mlp_ratio, activation, norm_eps, param_dtype, rngs):
        self.ln1 = LayerNorm(d_model, eps=norm_eps, param_dtype=param_dtype)
        self.attn = CausalSelfAttention(d_model, num_heads, param_dtype=param_dtype, rngs=rngs)
        self.ln2 = LayerNorm(d_model, eps=norm_eps, param_dtype=param_dtype)
        kw = dict(kernel_init=lecun_normal(), param_dtype=param_dtype, rngs=rngs)
        self.fc_in = nnx.Linear(d_model, mlp_ratio * d_model, **kw)
        self.fc_out = nnx.Linear(mlp_ratio * d_model, d_model, **kw)
        self.activation = activation

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc_out(get_activation(self.activation)(self.fc_in(self.ln2(x))))


class Transformer(nnx.Module):
    """Decoder-only Transformer: int tokens ``(B, T)`` -> logits ``(B, T, vocab_size)``.

    ``x = tok_embed[tokens] + pos_embed[:T]``; ``num_layers`` pre-norm blocks (causal multi-head attention with
    explicit per-head parameters, then an MLP ``d_model -> mlp_ratio d_model -> d_model``); a final LayerNorm;
    the unembedding ``Linear(d_model, vocab_size)`` with bias.

    Args:
        vocab_size, d_model, num_heads, num_layers, max_len: sizes (``d_head = d_model / num_heads``;
            ``d_model >= 3``: a LayerNorm over one feature is constant, over two it outputs
            ``+-(scale_0, -scale_1) + bias``, a function of one sign, so nothing before it would get a gradient).
        rngs: ``nnx.Rngs``.
        mlp_ratio: hidden width of the MLP blocks in units of ``d_model``.
        activation: MLP activation (``"relu"`` default; see :class:`~quotient_sgd.models.MLP`).
        classifier: ``True`` (default: a language model's logits always feed a softmax) returns
            ``log_softmax`` of the unembedding output (normalised logits; identical under
            ``optax.softmax_cross_entropy``) and declares the softmax-logit translation; ``False`` returns the
            raw unembedding output.  ``logits(tokens)`` always gives the raw output.
        norm_eps: LayerNorm epsilon inside the variance (``NORM_EPS = 1e-12``).
        param_dtype: parameter dtype.

    Parameter paths: ``("tok_embed", "embedding")`` ``(V, D)``, ``("pos_embed", "embedding")`` ``(max_len, D)``;
    per block ``i``: ``("blocks", i, "ln1" | "ln2", "scale" | "bias")`` ``(D,)``,
    ``("blocks", i, "attn", "w_q" | "w_k" | "w_v")`` ``(H, D, d)``, ``("blocks", i, "attn", "b_q" | "b_k" |
    "b_v")`` ``(H, d)``, ``("blocks", i, "attn", "w_o")`` ``(H, d, D)``, ``("blocks", i, "attn", "b_o")``
    ``(D,)``, ``("blocks", i, "fc_in" | "fc_out", "kernel" | "bias")``; ``("ln_f", "scale" | "bias")``;
    ``("unembed", "kernel")`` ``(D, V)``, ``("unembed", "bias")`` ``(V,)``.

    Example:
        >>> model = Transformer(13, 16, 2, 1, 8, rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 5), jnp.int32)).shape
        (2, 5, 13)
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_heads: int,
        num_layers: int,
        max_len: int,
        *,
        rngs: nnx.Rngs,
        mlp_ratio: int = 4,
        activation: str = "relu",
        classifier: bool = True,
        norm_eps: float = NORM_EPS,
        param_dtype=jnp.float32,
    ):
        self.activation = check_activation(activation)
        vocab_size, d_model, num_heads, num_layers, max_len, mlp_ratio = check_sizes(
            "Transformer", vocab_size=vocab_size, d_model=d_model, num_heads=num_heads, num_layers=num_layers,
            max_len=max_len, mlp_ratio=mlp_ratio)
        _check_heads("Transformer", d_model, num_heads)
        if d_model < 2:  # every read of the residual stream goes through a LayerNorm over its d_model features
            raise ValueError(f"Transformer: d_model must be >= 2, got {d_model}: a LayerNorm over one feature outputs "
                             f"its bias alone, and every read of the residual stream (attention, MLP, unembedding) "
                             f"goes through one, so the logits would not depend on the tokens")
        if d_model == 2:
            # a LayerNorm over two features centres them to (d / 2, -d / 2), d = x_0 - x_1, and normalises that to
            # (sign d, -sign d): the stream is read through one sign per position.  Measured (float64, 12 sequences
            # of 6 tokens): the loss gradient with respect to the embeddings and the attention weights was 1e-11
            # (d_model = 3: 0.1-0.2); every parameter before the final LayerNorm is stuck, and each of them is a
            # flat direction of the loss that no declared symmetry accounts for
            raise ValueError("Transformer: d_model must be >= 3, got 2: a LayerNorm over two features outputs "
                             "+-(scale_0, -scale_1) + bias, a function of the sign of x_0 - x_1 alone, so the logits "
                             "are piecewise constant in every parameter before the final LayerNorm (their gradients "
                             "are zero) and every read of the residual stream goes through one")
        classifier = check_flag("Transformer", "classifier", classifier)
        check_classes("Transformer", "vocab_size", vocab_size, classifier)
        norm_eps = check_eps("Transformer", "norm_eps", norm_eps)
        param_dtype = check_param_dtype("Transformer", param_dtype)
        check_rngs("Transformer", rngs)
        self.classifier = classifier
        self.max_len = max_len
        self.tok_embed = nnx.Embed(vocab_size, d_model, embedding_init=embed_init(), param_dtype=param_dtype, rngs=rngs)
        self.pos_embed = nnx.Embed(max_len, d_model, embedding_init=embed_init(), param_dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List(
            [
                Block(d_model, num_heads, mlp_ratio=mlp_ratio, activation=self.activation, norm_eps=norm_eps,
                      param_dtype=param_dtype, rngs=rngs)
                for _ in range(num_layers)
            ]
        )
        self.ln_f = LayerNorm(d_model, eps=norm_eps, param_dtype=param_dtype)
        self.unembed = nnx.Linear(d_model, vocab_size, kernel_init=lecun_normal(), param_dtype=param_dtype, rngs=rngs)

    def logits(self, tokens: jax.Array) -> jax.Array:
        """The raw unembedding output ``(..., T, vocab_size)`` for int tokens ``(..., T)``, ``T <= max_len``: one
        sequence ``(T,)`` gives ``(T, vocab_size)``, a batch ``(B, T)`` gives ``(B, T, vocab_size)``, more leading
        axes are batch axes too.  Concrete tokens outside ``[0, vocab_size)`` raise ``ValueError``; traced ones (under
        ``jit``) cannot be checked: the lookup then gives NaN (``>= vocab_size``) or wraps (negative).  Host tokens
        (NumPy arrays, lists) are checked before JAX converts them, which (without ``jax_enable_x64``) wraps int64 /
        uint64 values into 32 bits."""
        if not isinstance(tokens, jax.Array):
            host = np.asarray(tokens)
            if host.dtype.kind in "iu" and host.size:  # 2**32 + 3 became token 3 in jnp.asarray, silently
                self._check_token_range(int(host.min()), int(host.max()))
            elif host.dtype.kind == "O":  # e.g. Python integers beyond 64 bits
                raise ValueError(f"Transformer: tokens must be integer token ids in [0, vocab_size="
                                 f"{self.tok_embed.num_embeddings}), got {tokens!r}")
        tokens = jnp.asarray(tokens)
        if tokens.ndim == 0:
            raise ValueError("Transformer: tokens must have a sequence axis, shape (T,) or (batch, T); got a scalar")
        if tokens.ndim != 2:  # one sequence, or several batch axes: run it as a (batch, T) batch
            lead, T = tokens.shape[:-1], tokens.shape[-1]
            # sizes, not -1: a reshape of an empty sequence to (-1, 0) failed with a bare ZeroDivisionError
            z = self.logits(tokens.reshape(math.prod(lead), T))
            return z.reshape(*lead, T, z.shape[-1])
        if not jnp.issubdtype(tokens.dtype, jnp.integer):  # flax's Embed refused it naming neither model nor argument
            raise ValueError(f"Transformer: tokens must be integer token ids (e.g. int32 or int64), got dtype "
                             f"{tokens.dtype}")
        T = tokens.shape[-1]
        if T > self.max_len:
            raise ValueError(f"Transformer: tokens have sequence length {T}, which exceeds max_len={self.max_len} "
                             f"(the positional embedding's rows); sequences may have at most max_len tokens")
        if not isinstance(tokens, jax.core.Tracer) and tokens.size:
            # the embedding lookup fills a token >= V with NaN (every later position too, through attention) and
            # wraps a negative one to the end of the vocabulary, silently; traced tokens cannot be checked here
            t = np.asarray(tokens)  # numpy: under an outer jit that closes over the tokens, jnp.min would be traced
            self._check_token_range(int(t.min()), int(t.max()))
        # the token lookup in the table's own dtype, as the positional rows are read: nnx.Embed computes in the dtype
        # it was built with, so the model called with parameters of another dtype (the float32 parameters at which
        # quotient_trajectory evaluates the loss of a bfloat16 model) added bfloat16 tokens to float32 positions,
        # a bare TypePromotionError under strict promotion
        x = jnp.take(self.tok_embed.embedding[...], tokens, axis=0) + self.pos_embed.embedding[...][None, :T, :]
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_f(x))

    def _check_token_range(self, lo: int, hi: int) -> None:
        V = self.tok_embed.num_embeddings
        if lo < 0 or hi >= V:
            raise ValueError(f"Transformer: tokens must be integers in [0, vocab_size={V}), got values from {lo} "
                             f"to {hi}")

    def __call__(self, tokens: jax.Array) -> jax.Array:
        z = self.logits(tokens)
        return jax.nn.log_softmax(z, axis=-1) if self.classifier else z

    def symmetries(self) -> Product:
        """The symmetry group declared for this Transformer (THEORY section 1).

        Per block ``i`` (``a = ("blocks", i, "attn")``):

        - ``"qk/blocks.{i}"``: ``GL(kind="qk")`` per head on ``(w_q, b_q)``, ``(w_k, b_k)``:
          ``W_Q -> W_Q A``, ``W_K -> W_K A^{-T}`` (biases alike) leaves every score unchanged.
        - ``"vo/blocks.{i}"``: ``GL(kind="vo")`` per head on ``(w_v, b_v)``, ``w_o``: ``W_V -> W_V B``,
          ``W_O -> B^{-1} W_O``; the value bias moves with ``W_V`` because attention rows sum to one.
        - ``"permutation/blocks.{i}.heads"``: the heads (axis 0 of every per-head array) are summed, so their
          order is arbitrary.
        - ``"rescale/blocks.{i}.mlp"`` (relu / leaky_relu / identity only): ``fc_in`` columns and bias times
          ``a``, ``fc_out`` rows divided by ``a``.
        - ``"permutation/blocks.{i}.mlp"``: the MLP hidden units.

        and ``"translation/unembed"`` when ``classifier=True``.

        The declared group is a subgroup of the model's symmetries, not all of them: the directions below leave the
        function unchanged too but are not in :meth:`~quotient_sgd.symmetry.Product.vertical` (they count as
        horizontal), and canonicalisation / invariants do not identify points that differ along them.  Exact:

        - the key bias ``b_k`` does not enter the function at all (``q_t . b_k^h`` is the same for every key
          position ``s`` and cancels in the softmax): every direction of ``b_k`` is a symmetry;
        - ``b_v^h -> b_v^h + delta_h``, ``b_o -> b_o - sum_h delta_h W_O^h`` (attention rows sum to one, so the
          value bias reaches the output as ``b_v^h W_O^h``, beside ``b_o``);
        - ``tok_embed -> tok_embed + c``, ``pos_embed -> pos_embed - c`` on every row (one vector ``c``);
        - a LayerNorm's bias ``beta`` against the biases of what reads it: ``ln1.bias -> + delta``,
          ``b_q^h, b_k^h, b_v^h -> - delta W_Q^h, - delta W_K^h, - delta W_V^h``; ``ln2.bias`` against
          ``fc_in.bias``; ``ln_f.bias`` against ``unembed.bias``;
        - every read of the residual stream goes through a LayerNorm, which removes the stream's mean over
          features: adding ``c 1`` (``1`` the all-ones feature vector) to any row of ``tok_embed`` or ``pos_embed``,
          to ``b_o`` or ``fc_out.bias``, or ``u 1^T`` to ``w_o^h`` or ``fc_out.kernel``;
        - the normalised vector ``n`` of a LayerNorm is orthogonal to ``1``: a matrix ``W`` reading it (``w_q^h``,
          ``w_k^h``, ``w_v^h``, ``fc_in.kernel``, ``unembed.kernel``) may gain ``(1 / scale) u^T`` (the entrywise
          reciprocal of the norm's ``scale``) when its bias gains ``-(sum_i bias_i / scale_i) u``;
        - per-coordinate rescales between a LayerNorm's ``(scale, bias)`` and the rows of the matrices reading it;
        - with ``activation="identity"``, the whole ``GL`` of each MLP's hidden units (``fc_in`` kernel and bias
          times ``A``, ``fc_out`` kernel times ``A^{-1}`` from the left; the rescale and permutation declared are
          its diagonal and permutation matrices), and with ``"tanh"`` (odd) the sign flip of a hidden unit
          (its ``fc_in`` column and bias entry and its ``fc_out`` row negated; discrete).

        Exact for ``norm_eps -> 0`` only: scaling the whole residual stream (embeddings, ``w_o``, ``b_o``,
        ``fc_out``) by one factor.  Declaring these would couple every block into one overlap cluster, and the
        group components have no form for most of them.
        """
        comps = []
        hom = is_homogeneous(self.activation)
        for i in range(len(self.blocks)):
            a = ("blocks", i, "attn")
            comps.append(GL(left=(a + ("w_q",), a + ("b_q",)), right=(a + ("w_k",), a + ("b_k",)), kind="qk",
                            name=f"qk/blocks.{i}"))
            comps.append(GL(left=(a + ("w_v",), a + ("b_v",)), right=(a + ("w_o",), None), kind="vo",
                            name=f"vo/blocks.{i}"))
            comps.append(Permutation(members=tuple((a + (n,), 0) for n in
                                                   ("w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o")),
                                     name=f"permutation/blocks.{i}.heads"))
            fin_k, fin_b = ("blocks", i, "fc_in", "kernel"), ("blocks", i, "fc_in", "bias")
            fout_k = ("blocks", i, "fc_out", "kernel")
            if hom:
                comps.append(Rescale(incoming=((fin_k, 1), (fin_b, 0)), outgoing=((fout_k, 0),),
                                     name=f"rescale/blocks.{i}.mlp"))
            comps.append(Permutation(members=((fin_k, 1), (fin_b, 0), (fout_k, 0)),
                                     name=f"permutation/blocks.{i}.mlp"))
        if self.classifier:
            comps.append(Translation(kernel=("unembed", "kernel"), bias=("unembed", "bias"),
                                     name="translation/unembed"))
        return Product(comps, name="Transformer")
