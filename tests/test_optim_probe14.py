"""quotient_sgd.optim on further optimisers and inputs: transformations whose update names its extra arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

from quotient_sgd.optim import gauge_fix, horizontal, quotient_trajectory, train

from test_optim_trajectory import data, init_mlp, mlp_group, xent


def _value_scaled_sgd(lr):
    """A hand-written extra-args transformation whose update names the one extra argument it reads (``value``,
    the loss) and takes no ``**kwargs``: the step ``-lr * loss * g``."""

    def update(updates, state, params=None, *, value):
        del params
        return jax.tree.map(lambda g: -lr * value * g, updates), state

    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


def _hand_loop(tx, params, batches, pass_value):
    def step(carry, batch):
        params, state = carry
        loss, g = jax.value_and_grad(xent)(params, batch)
        updates, state = tx.update(g, state, params, **({"value": loss} if pass_value else {}))
        return (optax.apply_updates(params, updates), state), None

    return jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), batches)[0][0])(params)


def test_train_and_wrappers_pass_an_update_only_the_extra_arguments_it_names(x64):
    """``optax.contrib.sam``'s update names ``grad_fn`` alone (no ``**kwargs``): ``train`` and the wrappers
    (``quotient_trajectory``, ``horizontal``, ``gauge_fix``) handed it every extra argument they pass and failed with a
    bare "transparent_update_fn() got an unexpected keyword argument 'value'", although SAM without a spec is
    documented to run.  So did a hand-written transformation naming ``value`` alone.  Each now gets the extra
    arguments it names: the runs equal a hand-written loop."""
    params = init_mlp(jax.random.key(0), dtype=jnp.float64)
    group = mlp_group()
    batches = data(4, dtype=jnp.float64)
    sam = optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.05), sync_period=2)
    with jax.numpy_dtype_promotion("standard"):  # sam multiplies a bool by the parameters: not strict-clean
        want = _hand_loop(sam, params, batches, pass_value=False)
        got, _, _ = train(xent, params, sam, batches, donate=False)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
        # each wrapper's own call of the update it wraps
        tx = quotient_trajectory(gauge_fix(horizontal(sam, group), group), group, observables=("loss", "grad_norm"))
        _, _, traj = train(xent, params, tx, batches, donate=False)
        assert np.all(np.isfinite(np.asarray(traj["grad_norm"])))
    named = _value_scaled_sgd(0.1)
    got, _, _ = train(xent, params, named, batches, donate=False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(_hand_loop(named, params, batches, pass_value=True))):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("value, error, match", [
    ("a", TypeError, r"lr='a' is not allowed; need a finite real number >= 0"),
    (None, TypeError, r"lr=None is not allowed"),
    (True, TypeError, r"lr=True is not allowed"),
    (1 + 2j, TypeError, r"lr=\(1\+2j\) is not allowed"),
    (np.ones(2), ValueError, r"lr must be a scalar, got an array of shape \(2,\)"),
    (-0.1, ValueError, r"lr=-0.1 is not allowed"),
    (float("nan"), ValueError, r"lr=nan is not allowed"),
])
def test_observables_name_a_learning_rate_that_is_not_one_rate(value, error, match):
    """gradient_noise(lr=...) and predict_charge_drift(lr=...) took what they were given: a string or None failed in
    JAX's conversion naming neither ("could not convert string to float: 'a'"), a vector gave a vector of temperatures
    (and an unrelated "div got incompatible shapes" in the prediction), and True, -0.1 or NaN gave a temperature of
    that rate, silently.  Each is now refused naming the function, the argument and what is allowed; the check reads
    only the argument, before any compute."""
    from quotient_sgd import observables as qobs

    params = init_mlp(jax.random.key(0))
    group = mlp_group()
    with pytest.raises(error, match=r"gradient_noise: " + match):
        qobs.gradient_noise(lambda p: jnp.zeros(3), group, params, lr=value)
    with pytest.raises(error, match=r"predict_charge_drift: " + match):
        qobs.predict_charge_drift(group, params, params, params, {}, lr=value)
    with pytest.raises(error, match=r"predict_charge_drift: " + match.replace("lr", "momentum", 1)):
        qobs.predict_charge_drift(group, params, params, params, {}, lr=0.1, momentum=value)


def test_a_spec_with_momentum_or_decay_and_apply_every_is_refused(x64):
    """optax.apply_every(k) sums k steps of what comes before it.  Before the momentum, the momentum accumulated sums
    of gradients taken at earlier points, which are not orthogonal to the generators at the current one, and after
    the optimiser the update held k times the spec's decay: SGDSpec(0.1, momentum=0.9) predicted the drift 17% off
    and SGDSpec(0.1, weight_decay=0.05) 64% off, silently (the momentum held agrees with the update).  Such a spec is
    now refused at init; plain SGD with apply_every stays predicted exactly."""
    from quotient_sgd.optim import SGDSpec

    params = init_mlp(jax.random.key(0), dtype=jnp.float64)
    group = mlp_group()
    observables = ("charge_drift", "charge_drift_predicted")
    for inner, spec, match in (
            (optax.chain(optax.apply_every(3), optax.sgd(0.1, momentum=0.9)), SGDSpec(0.1, momentum=0.9),
             r"momentum=0.9 and optax.apply_every"),
            (optax.chain(optax.add_decayed_weights(0.05), optax.sgd(0.1), optax.apply_every(3)),
             SGDSpec(0.1, weight_decay=0.05), r"weight_decay=0.05 and optax.apply_every.*spec=None")):
        with pytest.raises(ValueError, match=match):
            quotient_trajectory(inner, group, spec=spec, observables=observables).init(params)
    tx = quotient_trajectory(optax.chain(optax.apply_every(3), optax.sgd(0.1)), group, spec=SGDSpec(0.1),
                             observables=observables)
    with jax.numpy_dtype_promotion("standard"):  # optax.apply_every multiplies by a bool: not strict-clean
        _, _, traj = train(xent, params, tx, data(6, dtype=jnp.float64), donate=False)
    observed, predicted = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(traj[k])]) for k in observables)
    assert np.max(np.abs(observed)) > 1e-3
    np.testing.assert_allclose(predicted, observed, rtol=0, atol=1e-12)


def test_a_batch_fn_that_does_not_take_step_and_key_is_named():
    """train(data=batch_fn) calls batch_fn(step, key); a batch_fn of the step alone failed inside the traced loop with
    a bare "<lambda>() takes 1 positional argument but 2 were given", naming neither train nor the convention.  Now
    a TypeError before any compute names data=batch_fn and the call."""
    params = init_mlp(jax.random.key(0))
    x, y = data(1)
    with pytest.raises(TypeError, match=r"train: data=batch_fn is called as batch_fn\(step, key\)"):
        train(xent, params, optax.sgd(0.1), lambda step: (x[0], y[0]), num_steps=2, donate=False)
    with pytest.raises(TypeError, match=r"batch_fn\(step, key\)"):
        train(xent, params, optax.sgd(0.1), lambda step, key, batch: (x[0], y[0]), num_steps=2, donate=False)
