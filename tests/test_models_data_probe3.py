"""Models and data, third probe: host tokens beyond 32 bits, empty sequences and images, the attention layer and
the normalisation layers on inputs of other shapes and dtypes, an empty batch through BatchNorm, and the data
generators' sizes given as JAX integers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd.models import CausalSelfAttention, Transformer


@pytest.fixture(scope="module")
def transformer():
    return Transformer(5, 4, 2, 1, 4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bad", [
    np.array([[2**32 + 3, 1]]),  # int64: jnp.asarray wrapped it to token 3 (x64 off)
    np.array([[2**32 + 3, 1]], np.uint64),
    np.array([[-2**32 + 1, 1]]),  # wrapped to token 1
    [[2**32 + 3, 1]],
])
def test_host_tokens_beyond_32_bits_are_refused_not_wrapped(transformer, bad):
    """Without x64, JAX converts int64 / uint64 host arrays to 32 bits by wrapping: 2^32 + 3 was read as token 3
    (the outputs equal those of [[3, 1]]) with no error; the range check saw the wrapped values."""
    with pytest.raises(ValueError, match=r"Transformer: tokens must be integers in \[0, vocab_size=5\), got values "
                                         r"from -?\d+ to \d+"):
        transformer(bad)
    with pytest.raises(ValueError, match=r"Transformer: tokens must be integer token ids"):
        transformer([[2**70, 1]])  # beyond 64 bits: NumPy holds Python ints (object dtype)
    # in-range host tokens of any integer dtype give the same outputs as the device array
    ref = transformer(jnp.asarray([[3, 1]], jnp.int32))
    for ok in (np.array([[3, 1]], np.int64), np.array([[3, 1]], np.uint64), [[3, 1]]):
        np.testing.assert_array_equal(np.asarray(transformer(ok)), np.asarray(ref))


def test_empty_sequences_give_empty_logits(transformer):
    """A 1-D empty sequence (and an empty sequence under several batch axes) failed with a bare ZeroDivisionError in
    a reshape to (-1, 0); a (B, 0) batch already gave (B, 0, V)."""
    assert transformer(jnp.zeros((0,), jnp.int32)).shape == (0, 5)
    assert transformer(np.zeros((2, 3, 0), np.int64)).shape == (2, 3, 0, 5)


def test_attention_layer_checks_and_casts_its_input():
    """``CausalSelfAttention`` (exported) failed on a wrong feature size or a one-sequence input with a bare einsum
    error, and on an input of another dtype than its parameters (float16, int) with a TypePromotionError under
    strict promotion; it now reads (..., T, d_model) real inputs in its parameters' dtype, as the models do."""
    attn = CausalSelfAttention(4, 2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 1, 5, 4))
    batch = attn(x.reshape(2, 5, 4))
    assert batch.shape == (2, 5, 4) and batch.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(attn(x)), np.asarray(batch).reshape(2, 1, 5, 4))
    np.testing.assert_allclose(np.asarray(attn(x[1, 0])), np.asarray(batch[1]), rtol=1e-5, atol=1e-6)
    half = x.reshape(2, 5, 4).astype(jnp.float16)
    np.testing.assert_array_equal(np.asarray(attn(half)), np.asarray(attn(half.astype(jnp.float32))))
    assert attn(jnp.ones((2, 5, 4), jnp.int32)).dtype == jnp.float32
    # causal: position t reads positions <= t only
    changed = attn(x.reshape(2, 5, 4).at[:, 3:].set(7.0))
    np.testing.assert_array_equal(np.asarray(changed[:, :3]), np.asarray(batch[:, :3]))
    assert not np.allclose(np.asarray(changed[:, 3:]), np.asarray(batch[:, 3:]))
    for bad in (jnp.ones((1, 3, 5)), jnp.ones((4,))):
        with pytest.raises(ValueError, match=r"CausalSelfAttention: x must be \(\.\.\., T, d_model=4\).*got shape"):
            attn(bad)
    with pytest.raises(ValueError, match="CausalSelfAttention: x must hold real numbers"):
        attn(jnp.ones((1, 3, 4), jnp.complex64))
