"""quotient_trajectory(curvature_batch="same"): the directional curvature on the step's own batch (THEORY section 4).

``kappa_k = <g_B(theta_{k+1}) - g_B(theta_k), Delta_k> / |Delta_k|^2`` with both gradients on step ``k``'s batch
``B``: the secant curvature of the step's batch loss along the step, without the batch noise that the default
(``g_{k+1}`` on the next batch) carries."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quotient_sgd.optim import SGDSpec, gauge_fix, observables_of, quotient_trajectory, train

from helpers import tiny_settings, tree_dot
from test_optim_trajectory import data, init_mlp, mlp_group, xent

CURV = ("curvature", "fold_number", "shock_number")
OPTIMISERS = {
    "sgd": (optax.sgd(0.1), SGDSpec(0.1)),
    "momentum": (optax.sgd(0.05, momentum=0.9), SGDSpec(0.05, momentum=0.9)),
    "adam": (optax.adam(0.01), None),
}


def _loop(tx, params, batches):
    """A hand-written loop passing loss_fn; returns the parameters before each step, the updates and the
    recorded curvature after each step."""
    @jax.jit
    def step(p, state, batch):
        loss_fn = lambda q: xent(q, batch)  # noqa: E731
        value, g = jax.value_and_grad(loss_fn)(p)
        u, state = tx.update(g, state, p, value=value, loss_fn=loss_fn)
        return optax.apply_updates(p, u), state, u, observables_of(state)["curvature"]

    state = tx.init(params)
    thetas, updates, kappas = [], [], []
    for k in range(batches[0].shape[0]):
        thetas.append(params)
        params, state, u, kappa = step(params, state, (batches[0][k], batches[1][k]))
        updates.append(u)
        kappas.append(kappa)
    return thetas, updates, np.asarray(kappas)


@jax.jit  # (op by op, the gradients and dots compiled each of their ops)
def _secant_jit(theta, delta, batch):
    g = jax.grad(xent)
    g0, g1 = g(theta, batch), g(optax.apply_updates(theta, delta), batch)
    return tree_dot(jax.tree.map(lambda a, b: a - b, g1, g0), delta) / tree_dot(delta, delta)


def _secant(theta, delta, batch):
    return float(_secant_jit(theta, delta, batch))


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_same_batch_curvature_is_the_secant_on_the_steps_batch(x64, name):
    """The curvature recorded at step k + 1 is the float64 secant of step k's batch loss along the update Delta_k the
    optimiser took (SGD, heavy ball, Adam: Delta is the actual update, not -eta g)."""
    inner, spec = OPTIMISERS[name]
    tx = quotient_trajectory(inner, mlp_group(), spec=spec, observables=CURV, curvature_batch="same")
    batches = data(6, dtype=jnp.float64)
    with jax.numpy_dtype_promotion("standard" if name == "adam" else "strict"):  # optax's bias correction
        thetas, updates, kappas = _loop(tx, init_mlp(jax.random.key(0), dtype=jnp.float64), batches)
    assert kappas[0] == 0.0  # the first step describes no earlier one
    want = [_secant(thetas[k], updates[k], (batches[0][k], batches[1][k])) for k in range(5)]
    np.testing.assert_allclose(kappas[1:], want, rtol=1e-9, atol=1e-12)
    assert np.min(np.abs(want)) > 1e-3  # a real curvature, not a zero compared with zero


def test_same_equals_next_on_full_batch_gd(x64):
    """With one batch for every step the next step's gradient is on the same batch: the two options agree."""
    x, y = data(1, dtype=jnp.float64)
    full = (jnp.repeat(x, 8, axis=0), jnp.repeat(y, 8, axis=0))
    params = init_mlp(jax.random.key(0), dtype=jnp.float64)
    out = {}
    for cb in ("next", "same"):
        tx = quotient_trajectory(optax.sgd(0.5), mlp_group(), spec=SGDSpec(0.5), observables=CURV, curvature_batch=cb)
        out[cb] = train(xent, params, tx, full, donate=False)[2]
    for k in CURV:
        np.testing.assert_allclose(out["same"][k], out["next"][k], rtol=1e-9, atol=1e-12)
    assert np.all(np.abs(out["same"]["curvature"][1:]) > 1e-3)


def test_same_equals_next_under_gauge_fix_full_batch(x64):
    """Under gauge_fix the curvature is of the step Delta taken from c(theta) with the transported gradient; the
    same-batch gradient is taken where that step lands, so on full batch the two options still agree."""
    x, y = data(1, dtype=jnp.float64)
    full = (jnp.repeat(x, 6, axis=0), jnp.repeat(y, 6, axis=0))
    params = init_mlp(jax.random.key(4), dtype=jnp.float64)
    group = mlp_group()
    out = {cb: train(xent, params, quotient_trajectory(gauge_fix(optax.sgd(0.3), group), group, spec=SGDSpec(0.3),
                                                       observables=CURV, curvature_batch=cb), full, donate=False)[2]
           for cb in ("next", "same")}
    np.testing.assert_allclose(out["same"]["curvature"], out["next"]["curvature"], rtol=1e-8, atol=1e-10)
    assert np.all(np.abs(out["same"]["curvature"][1:]) > 1e-3)


def test_same_batch_fold_number_follows_the_batch_hessian_not_the_noise(x64):
    """Softmax regression on random labels near its minimum, batches of 4, SGD at a small learning rate: the
    gradients of consecutive batches are nearly unrelated, so the default's fold number eta kappa = 1 - <g_{k+1},
    g_k> / |g_k|^2 sits near 1, while the same-batch one is eta times the batch Hessian's Rayleigh quotient along
    the step (the loss is near-quadratic over so short a step), far below 1."""
    lr, steps = 0.05, 20
    params = jax.tree.map(lambda a: 0.1 * a, init_mlp(jax.random.key(0), sizes=(3, 3), dtype=jnp.float64))
    group = mlp_group(n_layers=1)
    x, y = data(steps, b=4, dtype=jnp.float64)
    out = {cb: train(xent, params, quotient_trajectory(optax.sgd(lr), group, spec=SGDSpec(lr), observables=CURV,
                                                       curvature_batch=cb), (x, y), donate=False)
           for cb in ("next", "same")}
    # the Rayleigh quotient <Delta, H_B(theta_k) Delta> / |Delta|^2 of step k's batch, step k = -lr g_B(theta_k)
    tx = optax.sgd(lr)

    @jax.jit  # (op by op, each step compiled its gradient, its Hessian-vector product and its dots)
    def reference_step(p, st, batch):
        g = jax.grad(xent)(p, batch)
        d, st = tx.update(g, st, p)
        hd = jax.jvp(lambda q: jax.grad(xent)(q, batch), (p,), (d,))[1]
        return optax.apply_updates(p, d), st, tree_dot(d, hd) / tree_dot(d, d)

    p, st, rq = params, tx.init(params), []
    for k in range(steps):
        p, st, r = reference_step(p, st, (x[k], y[k]))
        rq.append(float(r))
    np.testing.assert_allclose(out["same"][0]["l0"]["kernel"], p["l0"]["kernel"], rtol=1e-6, atol=1e-9)  # one run
    fold_same = np.asarray(out["same"][2]["fold_number"][1:])
    fold_next = np.asarray(out["next"][2]["fold_number"][1:])
    np.testing.assert_allclose(fold_same, lr * np.asarray(rq[:-1]), rtol=0.05, atol=1e-6)
    assert np.max(fold_same) < 0.1
    assert np.median(fold_next) > 0.5
    assert np.median(fold_next) > 10 * np.median(fold_same)


def test_default_is_next_bitwise_and_is_the_next_batch_secant(x64):
    """Without the option the trajectory is that of curvature_batch="next", bit for bit, whose curvature is the
    secant with the next step's gradient (on the next batch)."""
    params = init_mlp(jax.random.key(0), dtype=jnp.float64)
    batches = data(6, dtype=jnp.float64)
    spec = SGDSpec(0.1)
    base = train(xent, params, quotient_trajectory(optax.sgd(0.1), mlp_group(), spec=spec), batches, donate=False)
    nxt = train(xent, params, quotient_trajectory(optax.sgd(0.1), mlp_group(), spec=spec, curvature_batch="next"),
                batches, donate=False)
    for a, b in zip(jax.tree.leaves(base[2]), jax.tree.leaves(nxt[2])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    @jax.jit  # (op by op, each step compiled its gradients and dots)
    def secant(p, batch, next_batch):
        g0 = jax.grad(xent)(p, batch)
        d = jax.tree.map(lambda a: -0.1 * a, g0)
        p1 = optax.apply_updates(p, d)
        g1 = jax.grad(xent)(p1, next_batch)
        return p1, tree_dot(jax.tree.map(lambda a, b: a - b, g1, g0), d) / tree_dot(d, d)

    p, want = params, []
    for k in range(5):
        p, kappa = secant(p, (batches[0][k], batches[1][k]), (batches[0][k + 1], batches[1][k + 1]))
        want.append(float(kappa))
    np.testing.assert_allclose(base[2]["curvature"][1:], want, rtol=1e-8, atol=1e-12)


def test_every_k_vmap_and_float32(x64):
    """every=3 records at the steps 3, 6 the values of every=1 (the extra gradient only where they are recorded);
    vmapped over two initialisations each member is its own run; float32 agrees with float64."""
    batches = data(8, dtype=jnp.float64)
    p0 = init_mlp(jax.random.key(0), dtype=jnp.float64)

    # one transformation per period, so that runs of the same shapes reuse train's compiled program
    txs = {every: quotient_trajectory(optax.sgd(0.1, momentum=0.5), mlp_group(), spec=SGDSpec(0.1, momentum=0.5),
                                      observables=CURV, every=every, curvature_batch="same") for every in (1, 3)}

    def run(p, every=1, b=batches):
        return train(xent, p, txs[every], b, donate=False)[2]["curvature"]

    one = np.asarray(run(p0))
    three = np.asarray(run(p0, every=3))
    np.testing.assert_allclose(three[[3, 6]], one[[3, 6]], rtol=1e-10)
    assert np.all(three[[4, 5]] == three[3]) and np.all(three[[1, 2]] == three[0])  # held between records
    p1 = init_mlp(jax.random.key(5), dtype=jnp.float64)
    both = np.asarray(jax.vmap(run)(jax.tree.map(lambda a, b: jnp.stack([a, b]), p0, p1)))
    np.testing.assert_allclose(both[0], one, rtol=1e-10)
    np.testing.assert_allclose(both[1], np.asarray(run(p1)), rtol=1e-10)
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p0)
    k32 = np.asarray(run(p32, b=(batches[0].astype(jnp.float32), batches[1])))
    assert k32.dtype == np.float32
    np.testing.assert_allclose(k32[1:], one[1:], rtol=2e-3, atol=1e-4)


def test_missing_loss_fn_and_bad_value_are_named():
    params = init_mlp(jax.random.key(0))
    tx = quotient_trajectory(optax.sgd(0.1), mlp_group(), observables=("curvature",), curvature_batch="same")
    state = tx.init(params)
    grads = jax.grad(xent)(params, (data(1)[0][0], data(1)[1][0]))
    with pytest.raises(ValueError, match="loss_fn"):
        jax.jit(tx.update)(grads, state, params)  # raised while tracing
    with pytest.raises(ValueError, match="curvature_batch.*'next', 'same'"):
        quotient_trajectory(optax.sgd(0.1), mlp_group(), curvature_batch="other")


def test_config_key_is_validated_and_wired():
    """observables.curvature_batch: refused outside its values (naming them), passed to quotient_trajectory."""
    from quotient_sgd.config import ConfigError
    from quotient_sgd.runner._build import make_optimizer

    assert tiny_settings().observables.curvature_batch == "next"
    with pytest.raises(ConfigError, match="observables.curvature_batch.*'next', 'same'"):
        tiny_settings(**{"observables.curvature_batch": "previous"})
    s = tiny_settings(**{"observables.curvature_batch": "same", "observables.names": ("curvature",)})
    params = init_mlp(jax.random.key(0))
    grads = jax.grad(xent)(params, (data(1)[0][0], data(1)[1][0]))
    tx = make_optimizer(s, mlp_group())
    with pytest.raises(ValueError, match="curvature_batch='same'.*loss_fn"):
        jax.eval_shape(tx.update, grads, tx.init(params), params)
    tx = make_optimizer(s.replace(**{"observables.curvature_batch": "next"}), mlp_group())
    jax.eval_shape(tx.update, grads, tx.init(params), params)  # the next batch's gradient needs no loss_fn
