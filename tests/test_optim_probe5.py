"""quotient_sgd.optim on further optimisers and inputs: SGD specs for optimisers whose state shows that they are
not SGD (Adafactor, noisy SGD, optimistic gradient descent, optax.contrib's adaptive methods); gauge_fix with
optax.masked / multi_transform states."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

from quotient_sgd.optim import SGDSpec, quotient_trajectory, train
from test_optim_trajectory import data, init_mlp, mlp_group, xent
from helpers import permutation_gauge_case

CHARGES = ("charge_drift", "charge_drift_predicted")

NOT_SGD = {
    "adafactor": lambda: optax.adafactor(1e-2),
    "noisy_sgd": lambda: optax.noisy_sgd(0.1, key=jax.random.key(0)),
    "optimistic": lambda: optax.optimistic_gradient_descent(0.1),
    "prodigy": lambda: optax.contrib.prodigy(0.1),
    "dog": lambda: optax.contrib.dog(0.1),
    "sophia": lambda: optax.contrib.sophia(1e-2),
    "schedule_free_sgd": lambda: optax.contrib.schedule_free_sgd(0.1),
    "mechanize": lambda: optax.contrib.mechanize(optax.sgd(0.1)),
    "momo": lambda: optax.contrib.momo(0.1),
}


@pytest.mark.parametrize("name", list(NOT_SGD))
def test_an_sgd_spec_for_other_non_sgd_optimisers_is_refused(name):
    """An SGDSpec given for Adafactor, noisy SGD, optimistic gradient descent or an optax.contrib adaptive optimiser
    was accepted, and its prediction reported as the SGD identity of a step the optimiser does not take (float64,
    6 steps of the test MLP: 100-103% off for adafactor, noisy_sgd, optimistic, prodigy, sophia; 55-92% for
    schedule_free_sgd, mechanize, momo; 3% for dog).  Now refused at init, naming the state."""
    params = init_mlp(jax.random.key(0))
    tx = quotient_trajectory(NOT_SGD[name](), mlp_group(), spec=SGDSpec(0.1), observables=CHARGES)
    with pytest.raises(ValueError, match=r"SGDSpec.*holds \['\w+State'.*spec=None"):
        tx.init(params)


KERNELS = lambda p: jax.tree.map(lambda a: a.ndim > 1, p)  # noqa: E731
LABELS = lambda p: jax.tree.map(lambda a: "kernel" if a.ndim > 1 else "bias", p)  # noqa: E731


@pytest.mark.parametrize("name", ["masked", "multi_transform"])
def test_gauge_fix_permutes_masked_optimiser_states_with_the_units(x64, name):
    """gauge_fix permutes the optimiser state with the units that the canonical sort reorders, but only subtrees
    with the parameters' exact structure: the momentum of optax.masked / optax.multi_transform holds
    optax.MaskedNode for the parameters it does not cover, so it stayed with the old unit order and every reorder
    handed a unit another unit's velocity (10 steps: the run's outputs 6.9 / 3.0 apart from the same run on the group
    without permutations).  Now permuted leaf by leaf, MaskedNodes kept: the two runs agree to rounding."""
    full, noperm, outputs = permutation_gauge_case(10)
    if name == "masked":
        tx = optax.masked(optax.sgd(0.3, momentum=0.9), KERNELS)
    else:
        tx = optax.multi_transform({"kernel": optax.sgd(0.3, momentum=0.9), "bias": optax.sgd(0.1, momentum=0.5)},
                                   LABELS)
    np.testing.assert_allclose(outputs(tx, full), outputs(tx, noperm), rtol=1e-8, atol=1e-8)


def test_matfree_lanczos_steps_above_the_parameter_count_is_refused_at_init():
    """lanczos_method='matfree' with more Lanczos steps than parameters failed at the first Hessian evaluation
    inside the training loop with matfree's own message about 'num_matvecs', an argument the caller never passed.
    Now init refuses it naming lanczos_steps, the parameter count and the method that allows it."""
    params = init_mlp(jax.random.key(0), sizes=(2, 2, 2))  # 12 parameters
    kw = dict(observables=("loss",), hessian_every=1, lanczos_method="matfree")
    with pytest.raises(ValueError, match=r"lanczos_steps=20 exceeds the 12 parameters.*'loop'"):
        quotient_trajectory(optax.sgd(0.1), mlp_group(n_layers=2), **kw).init(params)
    quotient_trajectory(optax.sgd(0.1), mlp_group(n_layers=2), lanczos_steps=12, **kw).init(params)


def test_set_hyperparams_refuses_a_vector_for_a_scalar_hyperparameter():
    """set_hyperparams(state, learning_rate=lrs) without vmap stored the vector as the learning rate, and train ran
    with it broadcast against the parameters (a 3-2-2 MLP trained with per-column learning rates 0.1 / 0.5, no
    error).  Now a ValueError naming the hyperparameter, both shapes and vmap; vmapped, each member gets its
    scalar."""
    from quotient_sgd.optim import set_hyperparams

    params = init_mlp(jax.random.key(0), sizes=(3, 2, 2))
    state = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1).init(params)
    lrs = jnp.array([0.1, 0.5])
    with pytest.raises(ValueError, match=r"learning_rate is stored with shape \(\), got .* shape \(2,\).*jax\.vmap"):
        set_hyperparams(state, learning_rate=lrs)
    swept = jax.vmap(lambda lr: set_hyperparams(state, learning_rate=lr))(lrs)
    np.testing.assert_array_equal(swept.hyperparams["learning_rate"], lrs)
    # a state built by vmap takes one value per member
    np.testing.assert_array_equal(set_hyperparams(swept, learning_rate=2 * lrs).hyperparams["learning_rate"], 2 * lrs)


@pytest.mark.parametrize("field", ["learning_rate", "weight_decay", "momentum", "coupled_weight_decay"])
def test_sgd_spec_refuses_a_vector_hyperparameter(field):
    """SGDSpec(learning_rate=jnp.array([0.1, 0.5])) was accepted; the prediction broadcast it against the charges
    and failed inside the first traced step with lax.scan's carry-type mismatch (or, where the shapes broadcast,
    predicted per-unit drifts of two optimisers at once).  Now a ValueError naming the field and the shape."""
    kw = {"learning_rate": 0.1, field: jnp.array([0.1, 0.5])}
    with pytest.raises(ValueError, match=rf"SGDSpec: {field} must be a scalar, got an array of shape \(2,\)"):
        SGDSpec(**kw)
    SGDSpec(**{"learning_rate": 0.1, field: jnp.asarray(0.1)})


def test_adam_preconditioner_reads_injected_decay_rates(x64):
    """adam_preconditioner used its own b1, b2, eps (the optax defaults) even where optax.inject_hyperparams held
    the optimiser's: with b1 = 0.8, b2 = 0.9, eps = 1e-3 injected, its P was not what the step divided by (the
    update up to 8.5x off -eta mu / P), and a sweep over b2 by set_hyperparams got one P for all members.  Now the
    injected values are read from the state: the update is exactly -eta mu / P for each member (Adam's step written
    with P, the identity adam_preconditioner states)."""
    from quotient_sgd.optim import adam_preconditioner, set_hyperparams
    from quotient_sgd.optim._adam import find_adam_state

    params = init_mlp(jax.random.key(0), sizes=(3, 2, 2), dtype=jnp.float64)
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=0.02, b1=0.8, b2=0.9, eps=1e-3)
    precond = adam_preconditioner()
    grads = [jax.tree.map(lambda a, i=i: jnp.cos(a + i), params) for i in range(3)]

    @jax.jit  # one program (vmapped eagerly, each batched op was compiled on its own)
    @jax.vmap
    def gap(b2):
        state = set_hyperparams(tx.init(params), b2=b2)
        for g in grads:
            u, state = tx.update(g, state, params)
        mu, p = find_adam_state(state).mu, precond(state)
        want = jax.tree.map(lambda m, q: -0.02 * m / q, mu, p)
        return jnp.max(jnp.stack([jnp.max(jnp.abs(a - b) / jnp.abs(b))
                                  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(want))]))

    with jax.numpy_dtype_promotion("standard"):  # optax.adam's bias correction mixes int32 and float
        assert float(jnp.max(gap(jnp.array([0.9, 0.999, 0.5])))) < 1e-12


def test_train_under_vmap_keeps_the_arrays_the_mapped_function_closes_over():
    """train's donation is documented as ignored under vmap, but a vmap over keys (seeds of the batches) with the
    parameters closed over, as a sweep writes it, donated those concrete parameters: after the sweep they were
    deleted ("Array has been deleted" at their next use).  Now nothing is donated under vmap / jit."""
    params = init_mlp(jax.random.key(0), sizes=(3, 2, 2))
    x = jax.random.normal(jax.random.key(1), (16, 3))
    y = jax.random.randint(jax.random.key(2), (16,), 0, 2)

    def batch_fn(step, key):
        idx = jax.random.choice(key, 16, (4,), replace=False)
        return x[idx], y[idx]

    tx = optax.sgd(0.1, momentum=0.9)
    keys = jax.random.split(jax.random.key(3), 2)
    _, _, traj = jax.vmap(lambda k: train(xent, params, tx, batch_fn, num_steps=3, key=k))(keys)
    assert not any(a.is_deleted() for a in jax.tree.leaves(params))
    _, _, ref = train(xent, params, tx, batch_fn, num_steps=3, key=keys[1], donate=False)
    np.testing.assert_allclose(traj["loss"][1], ref["loss"], rtol=1e-5)


def _eqns(jaxpr, inside_cond=False):
    from jax.extend.core import jaxprs_in_params

    for e in jaxpr.eqns:
        yield e, inside_cond
        for sub in jaxprs_in_params(e.params):
            yield from _eqns(sub, inside_cond or e.primitive.name == "cond")


def test_every_k_without_spec_canonicalises_only_for_the_recorded_steps(x64):
    """Without a spec the shock / fold numbers took the previous step's learning rate from its effective_lr, which
    needs the canonical point.  With every=K that learning rate was computed at every step, outside any branch, and
    from a cold start of the canonicalisation: on a 32-wide deep linear chain every=10 cost 177 ms a step against
    30 ms with every=1.  It was then computed (warm-started) only at the steps before a recorded one (5 ms a step).
    The rate is now the step's own -<g, Delta> / |g|^2 at the point the step is taken from (effective_lr's
    canonical frame multiplied the numbers by |g|^2 / |g_c|^2 at unbalanced points), which needs no canonical point:
    the update holds no SVD of the chain at all, and the recorded values are every=1's (on the test MLP)."""
    from flax import nnx

    from quotient_sgd import models

    model = models.DeepLinear(3, (2, 2), 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    params = nnx.split(model, nnx.Param, ...)[1]
    keys = ("curvature", "shock_number", "fold_number")
    tx = quotient_trajectory(optax.sgd(0.1, momentum=0.9), model.symmetries(), observables=keys, every=3)
    jaxpr = jax.make_jaxpr(lambda p, s: tx.update(p, s, p))(params, jax.eval_shape(tx.init, params))  # not compiled
    svds = [inside for e, inside in _eqns(jaxpr.jaxpr) if e.primitive.name == "svd"]
    assert not svds, svds
    # the values, on the test MLP (its canonical point is closed-form: cheaper to compile)
    params = init_mlp(jax.random.key(0), sizes=(3, 4, 3), dtype=jnp.float64)
    t1, t3 = (train(xent, params, quotient_trajectory(optax.sgd(0.1, momentum=0.9), mlp_group(n_layers=2),
                                                      observables=keys, every=every), data(7, dtype=jnp.float64),
                    donate=False)[2] for every in (1, 3))
    assert float(jnp.max(t1["shock_number"] + t1["fold_number"])) > 0
    for k in keys:
        np.testing.assert_allclose(t3[k][::3], t1[k][::3], rtol=1e-9, atol=1e-12, err_msg=k)
