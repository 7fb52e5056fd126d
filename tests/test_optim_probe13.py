"""quotient_sgd.optim on further inputs: NumPy integer periods under x64 with strict dtype promotion, a number for
observables=."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quotient_sgd.optim import gauge_fix, quotient_trajectory, train

from test_optim_trajectory import data, init_mlp, mlp_group, xent


def test_numpy_integer_periods_under_x64_and_strict_promotion(x64):
    """every / hessian_every / noise_every / hessian_k / lanczos_steps and gauge_fix's every given as NumPy integers
    (np.int64, what an array of settings holds) passed the check as integers, then ``count % every`` of the int32
    step counter failed inside the first traced step under x64 with strict promotion ("TypePromotionError: Input
    dtypes ('int32', 'int64') have no available implicit dtype promotion path").  They are now taken as the ints they
    hold: the run records on the schedule of the same Python ints."""
    params = init_mlp(jax.random.key(0), dtype=jnp.float64)
    batches = data(4, dtype=jnp.float64)
    group = mlp_group()

    def example_losses(p, batch):
        return jax.vmap(lambda x, y: xent(p, (x[None], y[None])))(*batch)

    tx = quotient_trajectory(gauge_fix(optax.sgd(0.1), group, every=np.int64(2)), group,
                             observables=("loss", "grad_norm"), every=np.int64(3), hessian_every=np.int64(2),
                             noise_every=np.int64(3), hessian_k=np.int64(2), lanczos_steps=np.int64(6),
                             hessian_at=("raw",))
    _, state, traj = train(xent, params, tx, batches, example_loss_fn=example_losses, donate=False)
    np.testing.assert_array_equal(traj["hessian_step"], [0, 0, 2, 2])
    gn, sig = np.asarray(traj["grad_norm"]), np.asarray(traj["noise_sigma2"])
    assert gn[0] == gn[1] == gn[2] != gn[3]  # recorded at steps 0 and 3
    assert sig[0] == sig[1] == sig[2] != sig[3]
    assert np.all(np.isfinite(np.asarray(traj["hessian_top_raw"])))
    assert int(state.inner_state.count) == 4 and bool(state.inner_state.applied) is False  # step 3: 3 % 2 != 0


@pytest.mark.parametrize("value", [5, 2.5])
def test_observables_that_is_not_a_sequence_is_named(value):
    """observables=5 failed with a bare "'int' object is not iterable" TypeError naming neither the argument nor the
    allowed names; now a ValueError naming both."""
    with pytest.raises(ValueError, match=r"observables must be a sequence of names from \('loss', .*got " + str(value)):
        quotient_trajectory(optax.sgd(0.1), mlp_group(), observables=value)


def test_observables_of_parameters_held_in_a_tuple(x64):
    """Parameters that are a tuple ``(W1, b1, W2, b2)`` (paths ``(0,)``, ``(1,)``, ...): the per-unit sums of
    effective_lr and angular_update took the tuple for a tuple of separate trees and failed with ``KeyError: (0,)``
    (so did quotient_trajectory's default observables).  They now equal those of the same parameters in a dict."""
    from quotient_sgd import observables as qobs
    from quotient_sgd.symmetry import Product, Rescale, Scale

    ks = jax.random.split(jax.random.key(0), 5)
    leaves = [jax.random.normal(k, s, jnp.float64) for k, s in zip(ks, [(3, 5), (5,), (5, 2), (2,)])]
    names = ("a", "b", "c", "d")

    def group(path):
        return Product((Rescale(incoming=((path(0), 1), (path(1), 0)), outgoing=((path(2), 0),), name="r"),
                        Scale(members=((path(3), None),), name="s")))

    grads = [jnp.cos(x) for x in leaves]
    updates = [-0.1 * g + 0.01 * x for g, x in zip(grads, leaves)]

    @jax.jit
    def observed(params, grads, updates):
        g = group((lambda i: (i,)) if isinstance(params, tuple) else (lambda i: (names[i],)))
        return (qobs.effective_lr(g, params, grads, updates, grads), qobs.angular_update(g, params, updates))

    as_tuple = observed(*(tuple(t) for t in (leaves, grads, updates)))
    as_dict = observed(*(dict(zip(names, t)) for t in (leaves, grads, updates)))
    for a, b in zip(jax.tree.leaves(as_tuple), jax.tree.leaves(as_dict)):
        np.testing.assert_allclose(a, b, rtol=1e-14)
    assert set(as_tuple[0]) == {"global", "r", "s"} and set(as_tuple[1]) == {"s"}
