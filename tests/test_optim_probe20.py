"""The optax extra arguments reach an update that takes them though its transformation is not typed extra-args aware
(``optax.MultiSteps``, a hand-written ``optax.GradientTransformation``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from quotient_sgd import models, optim

_MODEL = models.MLP(2, (3,), 1, rngs=nnx.Rngs(0))
_GRAPHDEF, _PARAMS = nnx.split(_MODEL, nnx.Param)
_GROUP = _MODEL.symmetries()
_X = jax.random.normal(jax.random.key(1), (3, 6, 2))
_Y = jax.random.normal(jax.random.key(2), (3, 6, 1))


def _loss(p, batch):
    x, y = batch
    return jnp.mean(jnp.square(nnx.merge(_GRAPHDEF, p)(x) - y))


def _recording_sgd(lr):
    """Plain SGD typed ``optax.GradientTransformation`` whose update takes ``**extra_args`` and keeps ``value``."""
    def init(params):
        return jnp.full((), jnp.nan)

    def update(updates, state, params=None, **extra_args):
        return jax.tree.map(lambda g: -lr * g, updates), jnp.asarray(extra_args.get("value", jnp.nan), jnp.float32)

    return optax.GradientTransformation(init, update)


def test_extra_arguments_reach_an_untyped_update_that_takes_them():
    # optax.with_extra_args_support dropped them: the update saw no value (NaN) under train and inside the wrappers
    for tx, inner_state in (
            (_recording_sgd(0.1), lambda s: s),
            (optim.quotient_trajectory(_recording_sgd(0.1), _GROUP, observables=("loss",)), lambda s: s.inner_state),
            (optim.horizontal(_recording_sgd(0.1), _GROUP), lambda s: s.inner_state)):
        _, state, traj = optim.train(_loss, _PARAMS, tx, (_X, _Y), donate=False)
        np.testing.assert_allclose(float(inner_state(state)), float(traj["loss"][-1]), rtol=1e-6)


def test_lbfgs_inside_multisteps_object_trains():
    # optax.MultiSteps(optax.lbfgs(), 1) failed under train with a bare "missing 3 required keyword-only arguments:
    # 'value', 'grad', and 'value_fn'": its update forwards **extra_args, but was not handed them
    data = (jnp.broadcast_to(_X[0], _X.shape), jnp.broadcast_to(_Y[0], _Y.shape))  # full batch: L-BFGS descends
    with jax.numpy_dtype_promotion("standard"):  # (MultiSteps' mean of the accumulated gradients)
        _, _, traj = optim.train(_loss, _PARAMS, optax.MultiSteps(optax.lbfgs(), 1), data, donate=False)
    loss = np.asarray(traj["loss"])
    np.testing.assert_allclose(loss[0], float(_loss(_PARAMS, (_X[0], _Y[0]))), rtol=1e-6)
    assert np.all(np.diff(loss) < 0), loss  # the zoom line search's steps decrease the loss


def test_extra_arguments_reach_an_untyped_update_inside_shock_aware_lr():
    # shock_aware_lr wrapped its inner optimiser with optax.with_extra_args_support, which dropped them (NaN here)
    from quotient_sgd.diagnostics import shock_aware_lr

    _, state, traj = optim.train(_loss, _PARAMS, shock_aware_lr(_recording_sgd(0.1)), (_X, _Y), donate=False)
    np.testing.assert_allclose(float(state.inner_state), float(traj["loss"][-1]), rtol=1e-6)
