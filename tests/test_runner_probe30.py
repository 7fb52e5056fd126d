"""Runner behaviours on inputs beyond the other runner tests: float64 enabled beside strict dtype promotion."""

import jax
import jax.numpy as jnp
import numpy as np
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
