"""quotient_trajectory on cases beyond the charge-identity tests: a spec without momentum for an optimiser that is not
the plain SGD step it describes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import charge_identity_error

from quotient_sgd.optim import SGDSpec, quotient_trajectory, train

from test_optim_trajectory import CHEAP, data, init_mlp, mlp_group, xent

ETA = 0.05

OFF_SPEC = {
    # the optimiser's momentum feeds beta m_k into the step (finite and up to 95% of a step's drift off before);
    # the first step, from a zero momentum, is the spec's
    "momentum_0.9": (lambda: optax.sgd(ETA, momentum=0.9), SGDSpec(ETA), 1),
    # a per-leaf scaling without momentum (the biases' gradients doubled): 118% of a step's drift off before
    "per_leaf_scale": (lambda: optax.chain(
        optax.masked(optax.scale(2.0), lambda p: jax.tree.map(lambda x: x.ndim == 1, p)), optax.sgd(ETA)),
        SGDSpec(ETA), 0),
    # a spec of learning rate 0 for a step that moves: its identity predicted a drift of 0 for Q(Delta)
    "spec_lr_0": (lambda: optax.sgd(ETA), SGDSpec(0.0), 0),
}


@pytest.mark.parametrize("name", list(OFF_SPEC))
def test_spec_without_momentum_for_another_step_is_reported_not_predicted(x64, name):
    """SGDSpec(eta) (momentum 0) for an optimiser whose step is not -eta (g' + lambda w) with g' orthogonal to the
    symmetry generators: the per-step checks of the update against the spec were skipped at momentum 0 (coupled and
    decoupled decay coincide there), and charge_drift_predicted was finite and wrong (optax.sgd(eta, momentum=0.9):
    95% of a step's drift off, float64 MLP, 20 steps; SGDSpec(0.0) for optax.sgd(eta): a drift of 0 predicted for
    Q(Delta)).  Now the linear term <grad Q(theta), Delta + eta lambda w> is checked at momentum 0 too (its vanishing
    is exactly what the identity needs at eta != 0; at eta = 0 the step must be zero), and the prediction is NaN from
    the first step where it fails; the observed drift stays finite."""
    make, spec, first = OFF_SPEC[name]
    params = init_mlp(jax.random.key(0), dtype=jnp.float64)
    tx = quotient_trajectory(make(), mlp_group(), spec=spec, observables=CHEAP)
    _, _, traj = train(xent, params, tx, data(6, dtype=jnp.float64), donate=False)
    for leaf in jax.tree.leaves(traj["charge_drift_predicted"]):
        leaf = np.asarray(leaf)
        assert np.all(np.isnan(leaf[first:])), (name, leaf)
        assert np.all(np.isfinite(leaf[:first])), (name, leaf)
    for leaf in jax.tree.leaves(traj["charge_drift"]):
        assert np.all(np.isfinite(np.asarray(leaf))), (name, leaf)


def test_spec_without_momentum_stays_exact_for_a_global_clip_and_decay(x64):
    """The check at momentum 0 passes what the identity describes exactly: a global-norm clip (one factor on the
    whole gradient) before a decoupled decay, in float64 to 1e-8 at every step."""
    params = init_mlp(jax.random.key(0), dtype=jnp.float64)
    inner = optax.chain(optax.clip_by_global_norm(0.05), optax.add_decayed_weights(0.01), optax.sgd(0.1))
    tx = quotient_trajectory(inner, mlp_group(), spec=SGDSpec(0.1, weight_decay=0.01), observables=CHEAP)
    _, _, traj = train(xent, params, tx, data(6, dtype=jnp.float64), donate=False)
    assert charge_identity_error(traj["charge_drift"], traj["charge_drift_predicted"]) < 1e-8


@pytest.mark.parametrize("bad", ["other_tree", "other_shapes"])
def test_update_names_gradients_not_like_params(bad):
    """quotient_trajectory's update with gradients that are not leaf for leaf like params (another model's, or
    leaves of another shape) failed inside the step with JAX's bare "pytree structure error: different numbers of
    pytree children" / "Incompatible shapes for broadcasting: shapes=[(3, 5), (3, 5, 1)]", naming neither argument;
    now a ValueError naming updates and params."""
    params = init_mlp(jax.random.key(0))
    grads = {"a": jnp.ones(3)} if bad == "other_tree" else jax.tree.map(lambda x: jnp.ones(x.shape + (1,)), params)
    tx = quotient_trajectory(optax.sgd(ETA), mlp_group(), observables=CHEAP)
    with pytest.raises(ValueError, match="updates must be a pytree like params"):
        tx.update(grads, tx.init(params), params)
