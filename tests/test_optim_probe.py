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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hessian_every=2, hessian_k=1.5), r"hessian_k must be an integer >= 1, got 1.5"),
        (dict(hessian_every=2, hessian_k=True, lanczos_steps=4), r"hessian_k must be an integer >= 1, got True"),
        (dict(hessian_every=2, lanczos_steps=6.0), r"lanczos_steps must be an integer >= 1, got 6.0"),
        (dict(seed=1.5), r"seed must be an integer .*got 1.5"),
        (dict(seed=jax.random.key(0)), r"seed must be an integer"),
        (dict(observables=("loss", "sharpness_quotient")), r"'sharpness_quotient' is recorded with hessian_every=K"),
        (dict(observables=("temperature",)), r"'temperature' is recorded with noise_every=K"),
        (dict(observables=("grad_nrom",)), r"unknown observables \['grad_nrom'\](.|\n)*did you mean 'grad_norm'"),
    ],
)
def test_more_bad_arguments_name_themselves(kwargs, match):
    """A float hessian_k / lanczos_steps failed inside the first traced step ('Shapes must be 1D sequences of
    concrete values of integer type'), True was taken as 1, a float or key seed failed inside jax.random.key;
    Hessian and noise keys put in observables= were only 'unknown'.  Now each error names the argument."""
    with pytest.raises((ValueError, TypeError), match=match):
        quotient_trajectory(optax.sgd(0.1), mlp_group(), **kwargs)


def _xent(p, batch):
    return xent_with_aux(p, batch)[0]


def _batch_fn(step, key):
    return jax.tree.map(lambda a: a[0], data(1))


def test_train_names_a_bad_key_unroll_or_opt_state():
    """An integer key failed inside the scan ('JAX encountered invalid PRNG key data'), a float unroll with
    "'float' object cannot be interpreted as an integer", and the inner optimiser's state passed as opt_state of
    the wrapped one with "'tuple' object has no attribute 'inner_state'"; each now names its argument."""
    params = init_mlp(jax.random.key(0))
    tx = quotient_trajectory(optax.sgd(0.1), mlp_group(), observables=("loss",))
    with pytest.raises(TypeError, match=r"train: key must be a PRNG key, e\.g\. jax\.random\.key\(0\).*got 0"):
        train(_xent, params, tx, _batch_fn, num_steps=2, key=0, donate=False)
    with pytest.raises(ValueError, match=r"train: unroll must be an integer >= 0 or a bool .*got 1.5"):
        train(_xent, params, tx, data(2), unroll=1.5, donate=False)
    with pytest.raises(ValueError, match=r"train: opt_state does not have the structure of tx\.init\(params\)"):
        train(_xent, params, tx, data(2), opt_state=optax.sgd(0.1).init(params), donate=False)
    # what was accepted stays accepted: a raw uint32 key, and the state tx.init gives
    _, state, traj = train(_xent, params, tx, _batch_fn, num_steps=2, key=jax.random.PRNGKey(1), donate=False)
    assert traj["loss"].shape == (2,)
    train(_xent, params, tx, data(2), opt_state=state, donate=False)
