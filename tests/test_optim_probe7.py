"""quotient_sgd.optim / observables on further inputs: derivatives of Lanczos extremes past the dimension, bad
arguments of lanczos_extremes, SGDSpec schedules, train's key / start_step / model_state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rescale_net as _rescale_net

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


# ----- train: one key, the int32 range of the steps, the model state's carry ---------------------------------------
def _batch_fn(step, key):
    x = jax.random.normal(key, (8, 3))
    return x, jnp.sin(x[:, :2])


@pytest.mark.parametrize("key, match", [
    (jax.random.split(jax.random.key(0), 2), r"train: key must be one PRNG key .* got a key array of shape \(2,\); "
                                             r"to run several seeds, jax.vmap train over the keys"),
    (jnp.zeros(5, jnp.uint32), r"train: key must be one PRNG key .* got raw uint32 key data of shape \(5,\) "
                               r"\(one key's is \(2,\)\)"),
])
def test_train_names_a_key_that_is_not_one_key(key, match):
    """A batch of keys (meant for seeds) failed inside the scan with fold_in's "accepts a single key", and raw key
    data of another length with "JAX encountered invalid PRNG key data", naming neither train nor key."""
    import optax

    from quotient_sgd.optim import train

    _, params, _, loss = _rescale_net()
    with pytest.raises(ValueError, match=match):
        train(loss, params, optax.sgd(0.1), _batch_fn, num_steps=2, key=key, donate=False)


@pytest.mark.parametrize("start_step, num_steps", [(2**31, 2), (2**31 - 1, 2), (-1, 2)])
def test_train_names_a_start_step_outside_the_int32_steps(start_step, num_steps):
    """The steps are int32: start_step=2**31 raised a bare OverflowError ("Python integer 2147483648 out of bounds
    for int32"), and 2**31 - 1 with two steps wrapped the second one to -2**31 silently (batch_fn got step
    -2147483648); a negative start_step gave batch_fn negative steps.  Now a ValueError naming both arguments;
    the last representable run still runs."""
    import optax

    from quotient_sgd.optim import train

    _, params, _, loss = _rescale_net()
    with pytest.raises(ValueError, match=rf"start_step must be >= 0 with start_step \+ num_steps <= 2\*\*31 .* got "
                                         rf"start_step={start_step}, num_steps={num_steps}"):
        train(loss, params, optax.sgd(0.1), _batch_fn, num_steps=num_steps, start_step=start_step, donate=False)
    if start_step > 0:
        ok = train(loss, params, optax.sgd(0.1), _batch_fn, num_steps=num_steps, start_step=2**31 - num_steps,
                   donate=False)[2]
        assert bool(jnp.all(jnp.isfinite(ok["loss"])))


def test_train_names_a_new_model_state_of_another_structure_or_dtype():
    """loss_fn returning nnx.state(model) (parameters included) in place of the batch statistics, or statistics cast
    to another dtype, failed in lax.scan naming only "carry[2]"; now a ValueError naming new_model_state, the
    leaf and both types.  The right convention still runs."""
    import optax
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 2, rngs=rngs)
            self.mean = nnx.BatchStat(jnp.zeros((2,)))

        def __call__(self, x):
            z = self.lin(x)
            self.mean.value = 0.9 * self.mean.value + 0.1 * jnp.mean(z, axis=0)
            return z - jnp.mean(z, axis=0)[None, :]

    from quotient_sgd.optim import train

    graphdef, params, stats = nnx.split(Net(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)

    def make(new_state):
        def loss_fn(p, ms, batch):
            m = nnx.merge(graphdef, p, ms)
            out = m(batch[0])
            return jnp.mean(jnp.square(out - batch[1])), (None, new_state(m))
        return loss_fn

    whole = make(nnx.state)
    cast = make(lambda m: jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.split(m, nnx.Param, nnx.BatchStat)[2]))
    right = make(lambda m: nnx.split(m, nnx.Param, nnx.BatchStat)[2])
    kw = dict(num_steps=2, model_state=stats, donate=False)
    with pytest.raises(ValueError, match=r"new_model_state returned by loss_fn must have the structure of "
                                         r"model_state"):
        train(whole, params, optax.sgd(0.1), _batch_fn, **kw)
    with pytest.raises(ValueError, match=r"new_model_state\['mean'\].value is bfloat16\[2\] but model_state holds "
                                         r"float32\[2\]"):
        train(cast, params, optax.sgd(0.1), _batch_fn, **kw)
    ms = train(right, params, optax.sgd(0.1), _batch_fn, **kw)[2]
    assert float(jnp.max(jnp.abs(ms["mean"].value))) > 0


# ----- float32 Lanczos: a bulk far below the top is not a breakdown -------------------------------------------------
def test_float32_lanczos_resolves_a_bulk_far_below_the_top():
    """A symmetric 200 x 200 operator with one outlier eigenvalue 1e3 above a bulk uniform in [-1e-2, 1e-2] (a
    Hessian's shape): after the outlier is captured, the residuals are ~1e-2, below the float32 breakdown tolerance
    2e-5 of |A| = 2e-2 that was used, so the iteration stopped (or restarted from 1 x 1 blocks) and returned a bottom
    eigenvalue of -0.0056 for a dense -0.0099 (44% off).  Now within 1% of the dense one, in float32."""
    rng = np.random.default_rng(0)
    n = 200
    ev = np.concatenate([[1e3], rng.uniform(-1e-2, 1e-2, n - 1)])
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = jnp.asarray(q @ np.diag(ev) @ q.T, jnp.float32)
    v0 = jnp.asarray(rng.normal(size=n), jnp.float32)
    for restart in (False, True):
        e = lanczos_extremes(lambda v: a @ v, v0, num_matvecs=40, k=1, restart=restart)
        assert e.bottom.dtype == jnp.float32
        np.testing.assert_allclose(float(e.top[0]), 1e3, rtol=1e-5)
        np.testing.assert_allclose(float(e.bottom[0]), ev.min(), rtol=1e-2)


@pytest.mark.parametrize("key, match", [
    (0, r"hessian_extremes: key must be one PRNG key, e.g. jax.random.key\(0\) .* got 0"),
    (jax.random.split(jax.random.key(0), 2), r"hessian_extremes: key must be one PRNG key.* got an array of shape "
                                             r"\(2,\)"),
])
def test_hessian_observables_name_a_key_that_is_not_one_key(key, match):
    """sharpness_raw / _horizontal / _quotient (through hessian_extremes) and sharpness_preconditioned with an
    integer seed failed with "JAX encountered invalid PRNG key data", with a batch of keys with split's "accepts a
    single key", naming neither the function nor key."""
    from quotient_sgd import observables as qobs

    params = {"w": jnp.ones(3)}
    loss = lambda p: jnp.sum(p["w"] ** 4)  # noqa: E731
    with pytest.raises(TypeError, match=match):
        qobs.sharpness_raw(loss, params, key=key, num_matvecs=3)
    with pytest.raises(TypeError, match=match.replace("hessian_extremes", "sharpness_preconditioned")):
        qobs.sharpness_preconditioned(loss, params, {"w": jnp.ones(3)}, key=key, num_matvecs=3)
