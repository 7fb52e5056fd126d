"""quotient_sgd.optim / observables on further inputs: derivatives of Lanczos extremes past the dimension, bad
arguments of lanczos_extremes, SGDSpec schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.observables import lanczos_extremes


def _symmetric(n, seed):
    b = np.random.default_rng(seed).normal(size=(n, n))
    return jnp.asarray(b + b.T)


@pytest.mark.parametrize("method, restart", [("loop", True), ("unrolled", False)])
def test_gradient_of_lanczos_extremes_past_the_dimension_is_finite_and_exact(x64, method, restart):
    """jax.grad of top + bottom eigenvalue (a sharpness penalty) with more Lanczos steps (8) than the dimension (6)
    was NaN in every entry: after the breakdown the Lanczos residuals are exactly zero, and the derivative of
    jnp.linalg.norm at zero is NaN.  Now it equals the derivative of the dense eigenvalues (exhausted Krylov space:
    the Ritz values are the eigenvalues)."""
    a0, v0 = _symmetric(6, 0), jnp.asarray(np.random.default_rng(1).normal(size=6))

    def lanczos(a):
        e = lanczos_extremes(lambda v: a @ v, v0, num_matvecs=8, k=2, method=method, restart=restart)
        return e.top[0] + e.bottom[0]

    def dense(a):
        w = jnp.linalg.eigvalsh(a)
        return w[-1] + w[0]

    value_and_grad = jax.jit(jax.value_and_grad(lanczos))
    (value, g), ref = value_and_grad(a0), jax.grad(dense)(a0)
    np.testing.assert_allclose(value, dense(a0), rtol=1e-12)
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(g + g.T, ref + ref.T, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(k=2.0), TypeError, r"lanczos_extremes: k must be an integer, got 2.0"),
    (dict(k=True), TypeError, r"lanczos_extremes: k must be an integer, got True"),
    (dict(num_matvecs=4.0), TypeError, r"lanczos_extremes: num_matvecs must be an integer, got 4.0"),
    (dict(v0=jnp.zeros(6)), ValueError, r"lanczos_extremes: v0 is zero"),
])
def test_lanczos_extremes_names_a_bad_argument(kwargs, error, match):
    """A float / bool k or num_matvecs passed the range check and failed inside the iteration with an error that
    named neither ("'float' object cannot be interpreted as an integer", "Shapes must be 1D sequences of concrete
    values of integer type", "iota does not accept dtype bool"); a zero v0 returned NaN silently."""
    a = jnp.diag(jnp.arange(6.0))
    kw = dict(dict(v0=jnp.ones(6), num_matvecs=5), **kwargs)
    with pytest.raises(error, match=match):
        lanczos_extremes(lambda v: a @ v, kw.pop("v0"), **kw)


# ----- SGDSpec: schedules (and injected values) that are not a real scalar --------------------------------------
def _rescale_net():
    """A 3-6-2 ReLU net with one rescale per hidden unit (float32), its loss and a batch."""
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


@pytest.mark.parametrize("schedule, error, match", [
    (lambda c: jnp.array([0.1, 0.2]), ValueError, r"SGDSpec.learning_rate: the schedule .* returned an array of shape "
                                                  r"\(2,\); need a scalar"),
    (lambda c: "0.1", TypeError, r"SGDSpec.learning_rate: the schedule .* returned '0.1'; need a real number"),
    (lambda c: None, TypeError, r"SGDSpec.learning_rate: the schedule .* returned None; need a real number"),
    (lambda c: 0.1 + 0.2j, TypeError, r"returned \(0.1\+0.2j\); need a real number"),
    (lambda c: True, TypeError, r"returned True; need a real number"),
    (lambda c, d: 0.1, TypeError, r"SGDSpec.learning_rate=.*: a schedule is called with one argument, the step count"),
])
def test_a_spec_schedule_that_does_not_give_a_real_scalar_is_named(schedule, error, match):
    """SGDSpec fields given as schedules were called at init and at every step without a check: a vector failed
    inside the prediction ("div got incompatible shapes for broadcasting: (6,), (2,)"), a string / None / a
    schedule of two arguments in JAX's conversion or the call, naming no field; a complex value lost its imaginary
    part (prediction made with 0.1) and a bool was taken as 1.0, silently.  Now quotient_trajectory's init names the
    field and what the schedule returned."""
    import optax

    from quotient_sgd.optim import SGDSpec, quotient_trajectory

    group, params, _, _ = _rescale_net()
    tx = quotient_trajectory(optax.sgd(0.1), group, spec=SGDSpec(schedule),
                             observables=("charge_drift", "charge_drift_predicted"))
    with pytest.raises(error, match=match):
        tx.init(params)


def test_a_spec_schedule_still_predicts_the_drift(x64):
    """The check keeps what worked: a schedule (optax's, an int-valued one) predicts the drift exactly."""
    import optax

    from quotient_sgd.optim import SGDSpec, quotient_trajectory, train

    group, params, data, loss = _rescale_net()
    params, data = jax.tree.map(lambda a: a.astype(jnp.float64), (params, data))
    sched = optax.linear_schedule(0.1, 0.01, 4)
    tx = quotient_trajectory(optax.chain(optax.add_decayed_weights(0.1), optax.sgd(sched)), group,
                             spec=SGDSpec(sched, weight_decay=lambda c: 0.1),
                             observables=("charge_drift", "charge_drift_predicted"))
    traj = train(loss, params, tx, data, donate=False)[2]
    d, pred = traj["charge_drift"]["r0"], traj["charge_drift_predicted"]["r0"]
    np.testing.assert_allclose(pred, d, rtol=1e-8, atol=1e-14)
    assert float(jnp.min(jnp.abs(d))) > 0

