"""Shock-aware learning-rate control: exact fold numbers on a quadratic, scan/vmap safety, and the catapult
setting (fewer loss spikes than a constant learning rate at no worse final loss)."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quotient_sgd.diagnostics import ShockAwareState, shock_aware_lr
from quotient_sgd.optim import train

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))


def _quad_loss(params, batch):
    h = batch
    return 0.5 * jnp.sum(h * jnp.square(params["w"]))


def test_fold_number_exact_on_a_quadratic_and_cap():
    """GD at lr 0.5 on curvatures (1, 6): fold number lr * 6 = 3 > 2 diverges; capped at 1.5 it converges and
    the live fold number equals the target."""
    h = jnp.asarray([1.0, 6.0])
    p0 = {"w": jnp.asarray([1.0, 1.0])}
    data = functools.partial(lambda h, s, k: h, h)
    _, _, tr_c = train(_quad_loss, p0, optax.sgd(0.5), data, num_steps=30, donate=False)
    assert tr_c["loss"][-1] > 1e3  # unstable
    tx = shock_aware_lr(optax.sgd(0.5), fold_target=1.5)
    _, state, tr = train(_quad_loss, p0, tx, data, num_steps=60, donate=False)
    assert isinstance(state, ShockAwareState)
    assert tr["loss"][-1] < 1e-3 * tr["loss"][0]
    np.testing.assert_allclose(state.fold_number, 1.5, rtol=1e-3)
    # kappa is a Rayleigh quotient along the step: between the extreme curvatures
    assert 1.0 - 1e-4 <= float(state.curvature) <= 6.0 + 1e-4


def test_state_structure_fixed_vmappable_and_policies():
    p0 = {"w": jnp.asarray([1.0, -2.0])}
    for policy in ("cap", "track"):
        tx = shock_aware_lr(optax.sgd(0.1, momentum=0.9), policy=policy,
                            fold_target=lambda c: jnp.where(c < 5, 2.5, 1.0), curvature_decay=0.5, max_scale=3.0)
        s0 = tx.init(p0)
        g = {"w": jnp.asarray([0.3, 0.1])}
        _, s1 = tx.update(g, s0, p0)
        assert jax.tree.structure(s0) == jax.tree.structure(s1)
        assert all(a.shape == b.shape and a.dtype == b.dtype
                   for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)))
    # vmap over learning rates inside train
    def run(lr):
        tx = shock_aware_lr(optax.sgd(lr), fold_target=1.0)
        data = functools.partial(lambda h, s, k: h, jnp.asarray([1.0, 6.0]))
        _, st, tr = train(_quad_loss, {"w": jnp.asarray([1.0, 1.0])}, tx, data, num_steps=40, donate=False)
        return tr["loss"][-1], st.fold_number
    losses, folds = jax.vmap(run)(jnp.asarray([0.1, 0.5, 1.0]))
    assert np.all(np.asarray(losses) < 1e-2)
    # lr 0.1: fold 0.6 below the cap, untouched; lr 0.5: capped at 1 (lr 1.0 may converge to exactly 0)
    np.testing.assert_allclose(folds[1], 1.0, rtol=1e-2)
    assert np.all(np.asarray(folds) <= 1.0 + 1e-3)
    with pytest.raises(ValueError, match="policy"):
        shock_aware_lr(optax.sgd(0.1), policy="bogus")


def test_shock_aware_lr_on_catapult_setting_fewer_spikes_no_worse_loss():
    import _common as C
    import shock_lr as exp6

    cfg = C.load_config("shock_lr", ["scale=test"])
    rows = {r["schedule"]: r for r in exp6.run(cfg)}
    const, cap = rows["constant"], rows["shock-aware cap"]
    assert const["loss spikes"] >= 1 and const["max loss / initial"] > 10  # the constant lr catapults
    assert cap["loss spikes"] < const["loss spikes"]
    assert cap["final loss"] <= const["final loss"]


def test_shock_aware_lr_arguments_are_checked():
    import optax

    for kw, needle in ((dict(fold_target=-1.0), "fold_target=-1.0"), (dict(shock_target=0.0), "shock_target=0.0"),
                       (dict(init_scale=float("inf")), "init_scale=inf"),
                       (dict(min_scale=0.5, max_scale=0.1), "min_scale=0.5 > max_scale=0.1")):
        with pytest.raises(ValueError, match=needle):
            shock_aware_lr(optax.sgd(0.1), **kw)
