"""Quotient observables against published and exact references: spherical motion dynamics of a scale-invariant
block (Wan et al. 2021), its effective learning rate eta / |w|^2, charge identities on a CNN under clipping,
coupled decay and learning-rate schedules, orbit invariance at large group elements, joint vmapped sweeps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quotient_sgd import observables as qobs
from quotient_sgd.optim import SGDSpec, quotient_trajectory, set_hyperparams, train
from quotient_sgd.symmetry import Product, Scale

# ----- spherical motion dynamics ----------------------------------------------------------------------------
# n normalised units w_j in R^d (rows of "w", one Scale factor each): the loss sees only w_j / |w_j|; a fresh
# noisy regression batch every step keeps the gradient from vanishing, so the norms reach an equilibrium.
N_UNITS, DIM, BATCH = 8, 8, 4
SMD_GROUP = Product((Scale(members=((("w",), 0),), name="s"),))


def _smd_loss(p, batch):
    x, y = batch
    u = p["w"] / jnp.linalg.norm(p["w"], axis=1, keepdims=True)
    return jnp.mean(jnp.square(x @ u.T - y))


def _smd_batch(step, key):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (BATCH, DIM), jnp.float64)
    target = jax.random.normal(jax.random.key(7), (N_UNITS, DIM), jnp.float64)
    return x, x @ target.T + jax.random.normal(ky, (BATCH, N_UNITS), jnp.float64)


def _heavy_ball(eta, beta):
    """Heavy-ball SGD with both decays injected: ``lam_c`` goes through the momentum (L2, coupled; PyTorch's and
    Wan et al.'s SGD), ``lam_d`` beside it (decoupled)."""

    def make(lam_c, lam_d):
        return optax.chain(optax.add_decayed_weights(lam_c), optax.trace(beta), optax.add_decayed_weights(lam_d),
                           optax.scale(-eta))

    return optax.inject_hyperparams(make)(lam_c=0.0, lam_d=0.0)


def _equilibrium_angles(eta, lam, beta, steps):
    """RMS over the second half of ``steps`` of the recorded angular update, for coupled then decoupled decay."""
    tx = quotient_trajectory(_heavy_ball(eta, beta), SMD_GROUP, observables=("angular_update",))
    p0 = {"w": jax.random.normal(jax.random.key(0), (N_UNITS, DIM), jnp.float64)}
    lams = jnp.array([[lam, 0.0], [0.0, lam]])
    states = jax.vmap(lambda lc, ld: set_hyperparams(tx.init(p0), lam_c=lc, lam_d=ld))(lams[:, 0], lams[:, 1])
    run = lambda s: train(_smd_loss, p0, tx, _smd_batch, num_steps=steps, opt_state=s, donate=False)  # noqa: E731
    _, _, traj = jax.vmap(run)(states)
    a = np.asarray(traj["angular_update"]["s"])[:, steps // 2:]
    return np.sqrt(np.mean(np.square(a), axis=1))


def _check_smd(eta, lam, beta, steps, rtol):
    coupled, decoupled = _equilibrium_angles(eta, lam, beta, steps)
    # Wan et al. 2021: L2 decay through the momentum -> sqrt(2 eta lam / (1 + beta)); decoupled decay beside the
    # momentum -> sqrt(2 eta lam (1 - beta) / (1 + beta)) (the momentum amplifies the gradient step by 1/(1 - beta)
    # but not the decay); both sqrt(2 eta lam) at beta = 0
    np.testing.assert_allclose(coupled, np.sqrt(2 * eta * lam / (1 + beta)), rtol=rtol)
    np.testing.assert_allclose(decoupled, np.sqrt(2 * eta * lam * (1 - beta) / (1 + beta)), rtol=rtol)


def test_angular_update_reaches_spherical_motion_equilibrium_with_momentum(x64):
    """With heavy-ball momentum 0.9 the equilibrium angular update is sqrt(2 eta lam / (1 + beta)) for coupled
    decay and sqrt(2 eta lam (1 - beta) / (1 + beta)) for decoupled decay (measured within 1.5% / 0.7% at
    600 steps), not sqrt(2 eta lam): 1.4x and 4.4x away."""
    _check_smd(eta=0.1, lam=0.05, beta=0.9, steps=600, rtol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_angular_update_spherical_motion_equilibrium_long(x64, beta):
    """Smaller eta * lam (the regime of the first-order result), 4000 steps: within 2% (measured <= 0.7%)."""
    _check_smd(eta=0.1, lam=0.01, beta=beta, steps=4000, rtol=0.02)


def test_effective_lr_of_a_scale_block_is_eta_over_squared_norm(x64):
    """For SGD with (coupled = decoupled, no momentum) weight decay the per-unit effective lr of a scale-invariant
    block is eta / |w_j|^2 = eta / (2 Q_j) (van Laarhoven 2017; Hoffer et al. 2018): the decay is radial, so it
    adds nothing to <Delta, g>."""
    eta, lam = 0.07, 0.3
    p = {"w": jax.random.normal(jax.random.key(0), (N_UNITS, DIM), jnp.float64) * jnp.arange(1.0, N_UNITS + 1)[:, None]}
    g = jax.grad(_smd_loss)(p, _smd_batch(0, jax.random.key(1)))
    upd = jax.tree.map(lambda gg, w: -eta * (gg + lam * w), g, p)
    out = qobs.effective_lr(SMD_GROUP, p, g, upd, g)
    np.testing.assert_allclose(out["s"], eta / jnp.sum(jnp.square(p["w"]), axis=1), rtol=1e-10)
    np.testing.assert_allclose(out["s"], eta / (2 * qobs.charges(SMD_GROUP, p)["s"]), rtol=1e-10)
