"""Runner behaviours on inputs beyond the other runner tests: float64 enabled beside strict dtype promotion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd import data as qdata
from quotient_sgd.runner import build, init_params
from tests.helpers import tiny_settings


def test_classification_evaluation_under_x64_counts_the_correct_predictions(x64):
    """With ``jax_enable_x64`` on, ``jnp.argmax`` gives int64 class indices and the labels are int32: under strict
    dtype promotion the evaluation's ``argmax(out) == y`` was refused, and every classification run (the digits
    MLP and CNN, the grokking Transformer, sparse parity) failed at its first chunk's evaluation.  The accuracy is
    the fraction of examples whose largest logit is their label (counted here in NumPy), the loss the mean
    cross-entropy (computed here in float64 from the same logits)."""
    s = tiny_settings(**{"data.name": "sparse_parity", "data.n_bits": 6, "data.k": 2, "data.n_train": 32,
                         "data.n_test": 16, "data.batch_size": 8})
    b = build(s)
    params = jax.jit(lambda: init_params(b, 3, 0.0))()
    batch = qdata.full_batch(b.dataset, "test")

    @jax.jit
    def evaluated(params, batch):
        return b.eval_fn(params, batch), nnx.merge(b.graphdef, params)(batch["x"])

    ev, logits = evaluated(params, batch)
    logits, y = np.asarray(logits, np.float64), np.asarray(batch["y"])
    assert float(ev["accuracy"]) == np.mean(np.argmax(logits, axis=-1) == y)
    z = logits - logits.max(axis=-1, keepdims=True)
    ce = np.log(np.exp(z).sum(axis=-1)) - z[np.arange(len(y)), y]
    np.testing.assert_allclose(float(ev["loss"]), ce.mean(), rtol=1e-5)
    assert jnp.dtype(ev["accuracy"].dtype) == jnp.float32


def test_init_params_refuses_a_scale_that_is_no_finite_number_at_least_0():
    """``init_params(b, seed, -1.0)`` (or NaN) returned the parameters of ``init_gauge = 0`` without a word (the
    re-gauging is kept only where the scale is > 0), and ``True`` re-gauged with a scale of 1; ``config.init_gauge``
    refuses all three.  Each is a ``ValueError`` naming ``init_gauge``, raised before anything is computed; the
    scales allowed (0, None, a NumPy or JAX float, a traced value) still trace."""
    from tests.helpers import tiny_settings as _tiny

    b = build(_tiny())
    for bad in (-1.0, -1e-30, float("nan"), float("inf"), True, np.bool_(False), "0.5", (0.5,), np.ones(2)):
        with pytest.raises(ValueError, match=r"init_params: init_gauge=.* is not allowed; need a finite number >= 0"):
            init_params(b, 0, bad)
    shapes = jax.eval_shape(lambda: init_params(b, 0, 0.0))
    for good in (0, None, np.float32(0.5), jnp.float32(2.0), 3):
        assert jax.eval_shape(lambda g=good: init_params(b, 0, g)) == shapes
    assert jax.eval_shape(jax.vmap(lambda g: init_params(b, 0, g)), jnp.ones(2)) is not None
