"""quotient_sgd.optim / observables on further inputs: parameters whose blocks have different float widths."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quotient_sgd.optim import SGDSpec, quotient_trajectory, train
from quotient_sgd.symmetry import Product, Scale

from helpers import charge_identity_error, dot_precisions


# ----- a float32 block ahead of a float64 block ------------------------------------------------------------------
def _two_width_case():
    """Two scale-invariant blocks, ``a`` float32 (the first leaf) and ``b`` float64, each its own component, and a
    float64 loss: ``tanh(x a / |a|) b / |b|`` against targets."""
    group = Product((Scale(members=((("a",), None),), name="sa"), Scale(members=((("b",), None),), name="sb")))

    def net(p, x):
        h = jnp.tanh(x @ (p["a"] / jnp.linalg.norm(p["a"]))).astype(jnp.float64)
        return h @ (p["b"] / jnp.linalg.norm(p["b"]))

    def loss(p, batch):
        x, y = batch
        return jnp.mean(jnp.square(net(p, x) - y))

    def example_loss(p, batch):
        x, y = batch
        return jnp.mean(jnp.square(net(p, x) - y), axis=1)

    params = {"a": jax.random.normal(jax.random.key(0), (3, 4), jnp.float32),
              "b": jax.random.normal(jax.random.key(1), (4, 2), jnp.float64)}
    x = jax.random.normal(jax.random.key(2), (12, 8, 3), jnp.float32)
    y = jax.random.normal(jax.random.key(3), (12, 8, 2), jnp.float64)
    return group, params, (x, y), loss, example_loss


def test_blocks_of_two_float_widths_are_observed(x64):
    """A float32 block ahead of a float64 one: the trajectory's scalars were held in the first leaf's dtype
    (float32) while the sums over both blocks came out float64, so train failed with "scan body function carry
    input and carry output must have equal types" (carry['prev_gd'], ['prev_dd']), the noise observables with
    "cond branches must have equal output types", and under strict promotion the charge prediction and the
    noise's ravel with a bare TypePromotionError; the prediction also rounded the float64 block's learning rate to
    float32.  Now every step runs, each charge is predicted in its own dtype (float64 block to 1e-8), and the
    scalars over the whole tree are float64."""
    group, params, data, loss, example_loss = _two_width_case()
    tx = quotient_trajectory(
        optax.chain(optax.trace(0.9, nesterov=True), optax.add_decayed_weights(0.05), optax.scale(-0.1)), group,
        spec=SGDSpec(0.1, weight_decay=0.05, momentum=0.9, nesterov=True), noise_every=3,
        observables=("grad_norm", "curvature", "update_vertical_norm", "charges", "charge_drift",
                     "charge_drift_predicted"))
    _, _, traj = train(loss, params, tx, data, donate=False, example_loss_fn=example_loss)
    for k in ("grad_norm", "curvature", "update_vertical_norm", "temperature"):
        assert traj[k].dtype == jnp.float64, k
        assert bool(jnp.all(jnp.isfinite(traj[k]))), k
    # the float32 block's charge is held in float32 or in the parameters' common dtype (the group computes
    # over parameters of two widths in their common one); the float64 block's never below float64
    assert traj["charges"]["sa"].dtype in (jnp.float32, jnp.float64) and traj["charges"]["sb"].dtype == jnp.float64
    drift, pred = traj["charge_drift"], traj["charge_drift_predicted"]
    assert charge_identity_error(drift["sb"], pred["sb"]) < 1e-8
    assert charge_identity_error(drift["sa"], pred["sa"]) < 1e-3  # float32: the rounding of the charges
    assert float(jnp.min(jnp.abs(drift["sb"]))) > 1e-4  # the decay moves both charges
    np.testing.assert_array_less(0.0, np.asarray(traj["noise_sigma2"]))


# ----- the sums of the observables at full precision ------------------------------------------------------------
def test_sums_as_products_ask_for_full_precision():
    """sum_all / sum_except / vdot (tree_dot's, the per-unit sums') are products with a vector of ones, asked at
    JAX's default precision: on recent NVIDIA GPUs (TF32) and TPUs (bfloat16) that rounds float32 operands to 10 or 7
    bits of mantissa before summing (a relative error up to 2^-11 / 2^-8 a term, where jnp.sum is exact to float32),
    which the charges, their drift and Lanczos' inner products cannot take.  Every such product now asks for
    Precision.HIGHEST, whatever jax_default_matmul_precision is (XLA:CPU computes it the same either way)."""
    from quotient_sgd._reduce import sum_all, sum_except, vdot
    from quotient_sgd.observables._util import tree_dot

    x = jnp.ones((3, 20, 40), jnp.float32)
    fns = [sum_all, lambda a: vdot(a, a), lambda a: tree_dot({"u": a, "v": a[0]}, {"u": a, "v": a[0]})]
    fns += [lambda a, i=i: sum_except(a, i) for i in range(3)]
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    with jax.default_matmul_precision("bfloat16"):
        for fn in fns:
            found = dot_precisions(fn, x)
            assert found and all(p == highest for p in found), found


# ----- set_hyperparams on a scheduled hyperparameter --------------------------------------------------------------
def test_set_hyperparams_refuses_a_hyperparameter_injected_as_a_schedule(x64):
    """optax.inject_hyperparams recomputes a hyperparameter given as a schedule at every update, over the value
    stored: set_hyperparams(state, learning_rate=lr) on one was a silent no-op, and a vmapped sweep over 0.01 and 0.3
    trained every member with the schedule (identical losses).  Now a ValueError naming it; the way it points to
    (the schedule's parameter injected as a number) sweeps."""
    from quotient_sgd.optim import set_hyperparams

    params = {"w": jnp.ones((3,), jnp.float64)}
    data = jnp.ones((4, 3), jnp.float64)

    def loss(p, x):
        return jnp.sum(jnp.square(p["w"] * x - 2.0))

    scheduled = optax.inject_hyperparams(optax.sgd)(learning_rate=optax.exponential_decay(0.1, 2, 0.5), momentum=0.9)
    with pytest.raises(ValueError, match=r"set_hyperparams: \['learning_rate'\] injected as a schedule"):
        set_hyperparams(scheduled.init(params), learning_rate=0.3)
    set_hyperparams(scheduled.init(params), momentum=0.5)  # a number beside it is still set

    def sgd_with_peak(peak):
        return optax.sgd(optax.exponential_decay(peak, 2, 0.5), momentum=0.9)

    tx = optax.inject_hyperparams(sgd_with_peak)(peak=0.1)
    states = jax.vmap(lambda v: set_hyperparams(tx.init(params), peak=v))(jnp.array([0.01, 0.03]))
    with jax.numpy_dtype_promotion("standard"):  # optax's schedules mix int32 counts and floats
        _, _, traj = jax.vmap(lambda s: train(loss, params, tx, data, opt_state=s, donate=False))(states)
    assert float(jnp.abs(traj["loss"][0, -1] - traj["loss"][1, -1])) > 1e-3


# ----- gauge_fix moves Adafactor's factored statistics with the units ---------------------------------------------
@pytest.mark.parametrize("name", ["adafactor", "sm3", "lbfgs"])
def test_gauge_fix_permutes_factored_per_axis_and_stacked_states_with_the_units(x64, name):
    """gauge_fix applied the canonical sort's unit permutations to the parameter-shaped leaves of the optimiser's
    state only; Adafactor keeps a matrix's second moment as a row and a column statistic (optax.FactoredState), which
    stayed in place, so after a reordering units were scaled by other units' statistics: the run with the
    permutations in the group computed another function than the run without them (0.081 in the log-probabilities
    after 10 steps of a 3-6-3 MLP; 0.027 after 15 of a 3-6-5-3 one).  So did SM3's per-axis accumulators
    (optax.ScaleBySM3State.mu, one vector per axis of a parameter: 0.052 after 10 steps) and optax.lbfgs's memory
    of the last steps (parameter-shaped vectors stacked along a leading axis: 1.09 after 11 steps of the 3-6-5-3
    MLP with its zoom line search).  They now move with the units: the two runs agree to rounding, as for Adam."""
    from quotient_sgd.optim import gauge_fix

    from test_optim_trajectory import apply_mlp, data, init_mlp, mlp_group, xent

    params = init_mlp(jax.random.key(0), sizes=(3, 6, 3), dtype=jnp.float64)
    probe = jax.random.normal(jax.random.key(9), (20, 3), jnp.float64)

    def loss(p, batch):
        return xent(p, batch), jax.nn.log_softmax(apply_mlp(p, probe), axis=-1)

    if name == "adafactor":
        inner = optax.adafactor(0.05, min_dim_size_to_factor=2)  # the kernels' moments factored
        assert any(isinstance(x, optax.FactoredState) and jnp.shape(x.v["l0"]["kernel"]) == (1,)
                   for x in jax.tree.leaves(inner.init(params), is_leaf=lambda x: isinstance(x, optax.FactoredState)))
    elif name == "sm3":
        inner = optax.sm3(0.05)
    else:
        inner = optax.lbfgs()
    outs = []
    for group in (mlp_group(2, permutation=True), mlp_group(2, permutation=False)):
        with jax.numpy_dtype_promotion("standard"):  # optax's adafactor is not strict-promotion clean
            outs.append(train(loss, params, gauge_fix(inner, group), data(10, b=16, dtype=jnp.float64), has_aux=True,
                              donate=False)[2]["aux"])
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-10)
