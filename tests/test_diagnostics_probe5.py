"""``shock_aware_lr`` probed against a hand computation of its documented rule, on mixed-dtype parameter trees,
and on bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quotient_sgd.diagnostics import shock_aware_lr
from quotient_sgd.optim import train

_H = np.array([1.0, 6.0])  # quadratic loss 0.5 sum(H w^2): gradient H w


def _hand(lr, fold_target, policy, init_scale, max_scale, steps, min_scale=1e-3, shock_target=1.0):
    """The module docstring's rule for plain gradient descent, in NumPy float64: (scale, fold number, loss before
    the step) per step."""
    p, pg, pu, out = np.ones(2), None, None, []
    for _ in range(steps):
        g = _H * p
        u = -lr * g
        if pg is None:
            s, fold = init_scale, 0.0
        else:
            kappa = (g - pg) @ pu / (pu @ pu)
            h = np.linalg.norm(u) / np.linalg.norm(g)
            f, sh = h * max(kappa, 0.0), h * max(-kappa, 0.0)
            s_fold, s_shock = fold_target / max(f, 1e-30), shock_target / max(sh, 1e-30)
            if policy == "cap":
                s = np.clip(min(1.0, s_fold, s_shock), min_scale, min(max_scale, 1.0))
            else:
                s = np.clip(min(s_fold if f > 0 else max_scale, s_shock), min_scale, max_scale)
            fold = s * f
        out.append((s, fold, 0.5 * np.sum(_H * p**2)))
        pg, pu, p = g, s * u, p + s * u
    return np.asarray(out)


@pytest.mark.parametrize("policy, lr, fold_target, init_scale, max_scale",
                         [("cap", 0.5, 1.0, 1.0, 1.0), ("cap", 0.5, 1.5, 0.3, 1.0), ("track", 0.5, 1.8, 0.5, 4.0),
                          ("track", 0.2, 0.7, 1.0, 4.0)])
def test_float64_scale_and_fold_number_equal_the_documented_rule(x64, policy, lr, fold_target, init_scale,
                                                                   max_scale):
    """With float64 parameters the scale, curvature and fold number were computed in float32, so the step taken
    differed from the documented rule by ~1e-8 relative; they are now computed in the parameters' dtype."""
    tx = shock_aware_lr(optax.sgd(lr), fold_target=fold_target, policy=policy, init_scale=init_scale,
                        max_scale=max_scale)
    p = jnp.ones(2, jnp.float64)
    state = tx.init(p)
    got = []
    for _ in range(6):
        u, state = tx.update(jnp.asarray(_H) * p, state, p)
        p = p + u
        got.append((float(state.scale), float(state.fold_number)))
    assert state.scale.dtype == state.fold_number.dtype == state.curvature.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), _hand(lr, fold_target, policy, init_scale, max_scale, 6)[:, :2],
                               rtol=1e-13, atol=1e-15)


def test_float64_train_vmapped_over_learning_rates_equals_the_documented_rule(x64):
    """Inside ``train`` (``lax.scan``, float64 state in the carry) and ``vmap`` over learning rates, each run's
    losses and final fold number equal the NumPy rule for its own learning rate."""
    def run(lr):
        tx = shock_aware_lr(optax.sgd(lr), fold_target=1.5, policy="track", max_scale=4.0, init_scale=0.5)
        p0 = {"w": jnp.ones(2, jnp.float64)}
        loss = lambda p, h: 0.5 * jnp.sum(h * p["w"] ** 2)
        _, st, tr = train(loss, p0, tx, lambda step, key: jnp.asarray(_H), num_steps=8, donate=False)
        return tr["loss"], st.fold_number
    lrs = (0.05, 0.3, 0.9)
    losses, folds = jax.jit(jax.vmap(run))(jnp.asarray(lrs, jnp.float64))
    for i, lr in enumerate(lrs):
        want = _hand(lr, 1.5, "track", 0.5, 4.0, 8)
        np.testing.assert_allclose(np.asarray(losses[i]), want[:, 2], rtol=1e-12)
        np.testing.assert_allclose(float(folds[i]), want[-1, 1], rtol=1e-12)


def test_mixed_dtype_parameter_tree_under_strict_promotion():
    """A tree with a float32 and a bfloat16 leaf raised TypePromotionError under strict dtype promotion (the tree
    dot product added a float32 and a bfloat16 scalar); each leaf's product is now accumulated in float32."""
    params = {"a": jnp.ones(1, jnp.float32), "b": jnp.ones(1, jnp.bfloat16)}
    curv = {"a": 1.0, "b": 6.0}  # same quadratic as above, one coordinate per leaf (values exact in bfloat16)
    tx = shock_aware_lr(optax.sgd(0.5), fold_target=1.0)
    state = tx.init(params)
    assert state.scale.dtype == jnp.float32
    for _ in range(2):
        g = {k: (curv[k] * v).astype(v.dtype) for k, v in params.items()}
        u, state = tx.update(g, state, params)
        assert u["b"].dtype == jnp.bfloat16
        params = optax.apply_updates(params, u)
    np.testing.assert_allclose(float(state.fold_number), _hand(0.5, 1.0, "cap", 1.0, 1.0, 2)[1, 1], rtol=1e-6)


def test_bad_inner_policy_and_init_scale_are_refused_naming_the_argument():
    """``inner`` that is not an optimiser (``optax.sgd`` itself, a float) was accepted and failed at init with an
    AttributeError; an ``init_scale`` outside the scale bounds was used as the first step (5x the inner step under
    "cap", which never lengthens a step); a policy error did not name the function."""
    with pytest.raises(TypeError, match=r"inner=.*GradientTransformation"):
        shock_aware_lr(optax.sgd)
    with pytest.raises(TypeError, match=r"inner=0\.1 .*got a float"):
        shock_aware_lr(0.1)
    with pytest.raises(ValueError, match=r"shock_aware_lr: policy='Cap' is not allowed; need 'cap' or 'track'"):
        shock_aware_lr(optax.sgd(0.1), policy="Cap")
    with pytest.raises(ValueError, match=r"policy=\['cap'\]"):
        shock_aware_lr(optax.sgd(0.1), policy=["cap"])
    for kw, allowed in [({"init_scale": 5.0}, r"\[0\.001, 1\.0\]"),
                        ({"init_scale": 2.0, "max_scale": 3.0}, r"\[0\.001, 1\.0\]"),
                        ({"init_scale": 5.0, "max_scale": 4.0, "policy": "track"}, r"\[0\.001, 4\.0\]"),
                        ({"init_scale": 0.01, "min_scale": 0.1}, r"\[0\.1, 1\.0\]")]:
        with pytest.raises(ValueError, match=rf"init_scale={kw['init_scale']} is not allowed.*{allowed}"):
            shock_aware_lr(optax.sgd(0.1), **kw)
    # in range: accepted, and the first step is scaled by exactly init_scale
    tx = shock_aware_lr(optax.sgd(0.5), init_scale=3.0, max_scale=4.0, policy="track")
    p = jnp.ones(2)
    u, _ = tx.update(p, tx.init(p), p)
    np.testing.assert_allclose(np.asarray(u), -1.5 * np.ones(2), rtol=1e-6)
