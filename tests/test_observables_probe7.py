"""Per-unit observables of parameters whose leaves have several dtypes (float32 kernels beside float64 biases)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from quotient_sgd import _tree, models, observables as obs, optim


def _mixed(params):
    """Kernels kept in float32, biases (and LayerNorm vectors) in float64."""
    return jax.tree.map(lambda x: x.astype(jnp.float64) if x.ndim == 1 else x, params)


def _units(x, axis):
    """A leaf as rows of one unit each (units along ``axis``; ``None``: the whole block is one unit)."""
    x = np.asarray(x, np.float64)
    return x.reshape(1, -1) if axis is None else np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def test_angular_update_of_a_unit_with_float32_and_float64_members_matches_the_angles(x64):
    # a LayerNorm CNN's scale component holds a float32 conv kernel and a float64 bias: the per-unit sums of the two
    # failed under strict dtype promotion with a bare TypePromotionError
    model = models.CNN(2, (3, 3), 3, norm="layer", classifier=True, rngs=nnx.Rngs(0))
    params = _mixed(nnx.split(model, nnx.Param)[1])
    group = model.symmetries()
    rng = np.random.default_rng(0)
    step = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), params)
    got = obs.angular_update(group, params, step)
    flat_p, flat_u = _tree.flatten(params)[0], _tree.flatten(step)[0]
    checked = 0
    for comp in group.components:
        if type(comp).__name__ != "Scale":
            continue
        w = np.concatenate([_units(flat_p[tuple(p)], a) for p, a in comp.members], axis=1)
        d = np.concatenate([_units(flat_u[tuple(p)], a) for p, a in comp.members], axis=1)
        cos = np.sum(w * (w + d), 1) / (np.linalg.norm(w, axis=1) * np.linalg.norm(w + d, axis=1))
        want = np.sqrt(np.mean(np.arccos(np.clip(cos, -1, 1)) ** 2))
        np.testing.assert_allclose(float(got[comp.name]), want, rtol=1e-6)
        checked += 1
    assert checked == 2


def test_trajectory_effective_lr_of_mixed_dtype_parameters_is_eta_times_the_unit_norm(x64):
    # SGD's per-unit rate is exactly eta (|w_in|^2 + |w_out|^2) (bias included); with float64 biases beside float32
    # kernels the default observables failed at init with a bare TypePromotionError
    model = models.MLP(3, (4,), 2, classifier=True, rngs=nnx.Rngs(0))
    graphdef, p32 = nnx.split(model, nnx.Param)
    params = _mixed(p32)
    group = model.symmetries()
    x = jax.random.normal(jax.random.key(1), (8, 3))
    y = jax.random.randint(jax.random.key(2), (8,), 0, 2)

    def loss_fn(p, batch):
        p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
        logits = nnx.merge(graphdef, p)(batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    eta = 0.1
    tx = optim.quotient_trajectory(optax.sgd(eta), group, every=2)
    state = tx.init(params)

    @jax.jit
    def step(p, st):
        value, g = jax.value_and_grad(loss_fn)(p, (x, y))
        return tx.update(g, st, p, value=value)[1]

    state = step(params, state)
    got = optim.observables_of(state)["effective_lr"]["rescale/layers.0"]
    w_in = np.concatenate([np.asarray(params["layers"][0]["kernel"], np.float64).T,
                           np.asarray(params["layers"][0]["bias"], np.float64)[:, None]], axis=1)
    w_out = np.asarray(params["layers"][1]["kernel"], np.float64)
    want = eta * (np.sum(w_in**2, 1) + np.sum(w_out**2, 1))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    assert np.asarray(got).dtype == np.float64
    recorded = {k: v for k, v in optim.observables_of(state).items() if k != "charge_drift_predicted"}  # (no spec)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(recorded))


def test_frozen_projection_and_dense_hessian_of_mixed_dtype_parameters(x64):
    # ravelling float32 kernels beside float64 biases failed under strict dtype promotion with a bare
    # TypePromotionError (frozen_horizontal, hence lanczos_method="unrolled", and dense_hessian)
    model = models.MLP(3, (4,), 2, classifier=True, rngs=nnx.Rngs(0))
    graphdef, p32 = nnx.split(model, nnx.Param)
    params = _mixed(p32)
    wide = jax.tree.map(lambda a: a.astype(jnp.float64), p32)
    group = model.symmetries()
    x = jax.random.normal(jax.random.key(1), (8, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (8,), 0, 2)

    def loss(p):  # one function of the parameters' values, whatever their dtypes
        p = jax.tree.map(lambda a: a.astype(jnp.float64), p)
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).mean()

    rng = np.random.default_rng(1)
    v = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), params)
    frozen, direct = jax.jit(lambda p, u: (obs.frozen_horizontal(group, p)(u), group.horizontal(p, u)))(params, v)
    for a, b, ref in zip(jax.tree.leaves(frozen), jax.tree.leaves(direct), jax.tree.leaves(params)):
        assert a.dtype == ref.dtype
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-6)
    dense = jax.jit(lambda p: obs.dense_hessian(loss, p))  # (op by op it took seconds)
    mixed = dense(params)
    assert mixed.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(mixed), np.asarray(dense(wide)), rtol=1e-5, atol=1e-6)


def test_low_precision_arguments_of_the_step_observables_are_summed_in_float32(x64):
    # float16 sums overflowed (|g|^2 > 65504: grad_norm inf, effective_lr 0) and a bfloat16 curvature came from the
    # difference of two rounded inner products; the observables now widen their arguments as quotient_trajectory does
    model = models.MLP(3, (4,), 2, classifier=True, rngs=nnx.Rngs(0), param_dtype=jnp.float16)
    params = nnx.split(model, nnx.Param)[1]
    group = model.symmetries()
    rng = np.random.default_rng(2)
    grads = jax.tree.map(lambda a: jnp.asarray(80 * rng.standard_normal(a.shape), jnp.float16), params)
    step = jax.tree.map(lambda g: (-0.01 * g).astype(jnp.float16), grads)
    # bfloat16: kappa from gradients 1% apart
    g_prev = jax.tree.map(lambda a: a.astype(jnp.bfloat16), grads)
    g_next = jax.tree.map(lambda a: (a.astype(jnp.float32) * 1.01 + 0.3).astype(jnp.bfloat16), grads)
    s = jax.tree.map(lambda a: a.astype(jnp.bfloat16), step)

    @jax.jit
    def observe(params, grads, step, g_prev, g_next, s):
        # (grads_canonical = grads: the rate is then -<g, Delta> / |g|^2, whose |g|^2 overflowed)
        return (obs.grad_norm(grads), obs.effective_lr(group, params, grads, step, grads)["global"],
                obs.update_split_norms(group, params, step), obs.directional_curvature(g_prev, g_next, s))

    norm, rate, (h, v), kappa = observe(params, grads, step, g_prev, g_next, s)
    # the references: the same values in float64 (exactly), summed by NumPy
    f64 = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])  # noqa: E731
    g, d, gp, gn, sd = (f64(t) for t in (grads, step, g_prev, g_next, s))
    assert g @ g > 65504  # beyond float16
    np.testing.assert_allclose(float(norm), np.sqrt(g @ g), rtol=1e-6)
    np.testing.assert_allclose(float(rate), -(g @ d) / (g @ g), rtol=1e-5)
    np.testing.assert_allclose(float(h) ** 2 + float(v) ** 2, d @ d, rtol=1e-5)
    np.testing.assert_allclose(float(kappa), (gn - gp) @ sd / (sd @ sd), rtol=1e-4)
    # the noise of per-example gradients a_i (losses <a_i, theta>) against the same values in float64
    a = jax.tree.map(lambda x: jnp.asarray(80 * rng.standard_normal((3,) + x.shape), jnp.float16), params)

    def noise(p, a):
        losses = lambda q: sum(jnp.sum(ai * qi[None], axis=tuple(range(1, ai.ndim)))  # noqa: E731
                               for ai, qi in zip(jax.tree.leaves(a), jax.tree.leaves(q)))
        return obs.gradient_noise(losses, group, p, lr=0.1).sigma2

    wide = lambda t: jax.tree.map(lambda x: x.astype(jnp.float64), t)  # noqa: E731
    noise = jax.jit(noise)  # (op by op it took seconds)
    low, ref = noise(params, a), noise(wide(params), wide(a))
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(float(low), float(ref), rtol=1e-4)
