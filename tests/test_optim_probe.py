"""The public API of quotient_sgd.optim on inputs beyond the main tests: auxiliary outputs, argument checks."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quotient_sgd.optim import flatten_trajectory, quotient_trajectory, train
from test_optim_trajectory import apply_mlp, data, init_mlp, mlp_group


def xent_with_aux(p, batch):
    x, y = batch
    logits = apply_mlp(p, x)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    return loss, (jnp.mean((jnp.argmax(logits, -1) == y).astype(logits.dtype)), logits)


def test_flatten_trajectory_flattens_a_tuple_aux_for_savez():
    """An aux returned as a tuple (accuracy, logits) became one entry holding the tuple, which numpy.savez
    could not store (arrays of different shapes); now every array has its own key."""
    tx = quotient_trajectory(optax.sgd(0.1), mlp_group(), observables=("loss", "charges"))
    _, _, traj = train(xent_with_aux, init_mlp(jax.random.key(0)), tx, data(3), has_aux=True, donate=False)
    flat = flatten_trajectory(traj)
    assert {"aux/0", "aux/1", "loss", "charges/r0", "charges/t/bias"} <= set(flat)
    buf = io.BytesIO()
    np.savez(buf, **flat)
    buf.seek(0)
    with np.load(buf) as z:
        np.testing.assert_array_equal(z["aux/1"], traj["aux"][1])
        assert z["aux/1"].shape == (3, 8, 3) and z["aux/0"].shape == (3,)
    # NamedTuple fields by name, None left out, dict order kept
    from collections import namedtuple

    pair = namedtuple("pair", "acc logits")
    out = flatten_trajectory({"b": {"y": 1, "x": None}, "aux": pair(2, [3, {"z": 4}])}, sep=".")
    assert out == {"b.y": 1, "aux.acc": 2, "aux.logits.0": 3, "aux.logits.1.z": 4}
