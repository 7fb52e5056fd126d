"""quotient_sgd.optim / observables on further inputs: the kind of every key a trajectory holds, Lanczos on
parameters of several or narrow dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quotient_sgd import observables as qobs
from quotient_sgd.optim import flatten_trajectory, quotient_trajectory, train


def _rescale_net():
    """A 3-6-2 ReLU net with one rescale per hidden unit (float32), its loss and four batches."""
    from quotient_sgd.symmetry import Product, Rescale

    group = Product((Rescale(incoming=((("l0", "kernel"), 1), (("l0", "bias"), 0)), outgoing=((("l1", "kernel"), 0),),
                             name="r0"),))
    k0, k1 = jax.random.split(jax.random.key(0))
    params = {"l0": {"kernel": jax.random.normal(k0, (3, 6)), "bias": jnp.zeros((6,))},
              "l1": {"kernel": jax.random.normal(k1, (6, 2)), "bias": jnp.zeros((2,))}}
    x = jax.random.normal(jax.random.key(1), (4, 16, 3))
    data = (x, jnp.sin(x[..., :2]))

    def loss(p, batch):
        h = jax.nn.relu(batch[0] @ p["l0"]["kernel"] + p["l0"]["bias"][None, :])
        return jnp.mean(jnp.square(h @ p["l1"]["kernel"] + p["l1"]["bias"][None, :] - batch[1]))

    return group, params, data, loss


# ----- every key of a trajectory has a kind ------------------------------------------------------------------------
def test_every_key_of_a_trajectory_has_a_kind():
    """train(..., has_aux=True) puts the loss_fn's aux into the trajectory under "aux", and a run directory's
    trajectory.npz holds "step"; kind_of raised KeyError on both ("no observable emits the trajectory key 'aux'"),
    so code that sorts a trajectory's keys by kind failed on them.  Both are raw now (never trusted as invariant),
    for every flattened key as well."""
    group, params, data, loss = _rescale_net()

    def loss_aux(p, batch):
        value = loss(p, batch)
        return value, {"twice": 2 * value, "pair": (value, -value)}

    tx = quotient_trajectory(optax.sgd(0.05), group)
    traj = train(loss_aux, params, tx, data, has_aux=True, donate=False)[2]
    flat = flatten_trajectory(traj)
    flat["step"] = np.arange(4)
    assert any(k.startswith("aux/") for k in flat)
    kinds = {k: qobs.kind_of(k) for k in flat}
    assert set(kinds.values()) <= {qobs.ORBIT_INVARIANT, qobs.REDUCED_DYNAMICS, qobs.RAW}
    assert {k: v for k, v in kinds.items() if k.startswith("aux") or k == "step"} == {
        "aux/twice": qobs.RAW, "aux/pair/0": qobs.RAW, "aux/pair/1": qobs.RAW, "step": qobs.RAW}
    assert qobs.kind_of("aux") == qobs.RAW and qobs.kind_of("loss") == qobs.ORBIT_INVARIANT
    with pytest.raises(KeyError, match="no observable emits the trajectory key 'auxiliary'"):
        qobs.kind_of("auxiliary")
