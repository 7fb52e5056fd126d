r"""The exact discrete charge identities of SGD, with and without momentum (THEORY section 2).

Every charge is a quadratic form ``Q(theta) = 1/2 theta^T A theta`` with symmetric generator ``A`` (rescale,
scale, the symmetric part of GL), or a linear form ``S(theta) = <s, theta>`` (translation).  Invariance of the
loss gives ``<grad L(theta), A theta> = 0`` (resp. ``<grad L, s> = 0``) at every point, per batch.  Write
``B(x, y) = x^T A y = Q(x + y) - Q(x) - Q(y)`` (polarisation).

**The optimiser.**  SGD with heavy-ball or Nesterov momentum ``beta``, learning rate ``eta``, coupled weight
decay ``lambda_c`` (added to the gradient before the momentum, ``optax.chain(add_decayed_weights, sgd)``) and
decoupled weight decay ``lambda_d`` (``theta -> (1 - eta lambda_d) theta`` beside the step, as in THEORY's
table); ``a = 1 - eta lambda_d``:

    m_{k+1}     = beta m_k + g_k + lambda_c theta_k                 (optax.trace; m_0 = 0)
    d_k         = m_{k+1}                                            (heavy ball)
                = g_k + lambda_c theta_k + beta m_{k+1}              (Nesterov)
    theta_{k+1} = a theta_k - eta d_k.

**The recursion.**  Carry the cross term ``c_k = theta_k^T A m_k`` (``c_0 = 0``).  By invariance
``theta_k^T A g_k = 0``, so with ``p_k = theta_k^T A m_{k+1} = beta c_k + 2 lambda_c Q_k``:

    r_k     = theta_k^T A d_k = p_k                     (heavy ball)
                              = 2 lambda_c Q_k + beta p_k  (Nesterov)
    Q_{k+1} = a^2 Q_k - a eta r_k + eta^2 Q(d_k)                                          (exact)
    c_{k+1} = theta_{k+1}^T A m_{k+1} = a p_k - eta B(d_k, m_{k+1}).

Without momentum (``beta = 0``, ``lambda_c = 0``) this is THEORY's ``Q+ = (1 - eta lambda)^2 Q + eta^2 Q(g)``;
the momentum adds the velocity coupling ``-a eta beta c_k`` (heavy ball) or ``-a eta beta^2 c_k`` (Nesterov), and
``c`` itself is driven by the velocity's own charge ``B(d, m)``.  For a linear charge ``S`` the same algebra
gives, with ``s_k = S(m_k)`` and ``p_k = beta s_k + lambda_c S_k``:

    S_{k+1} = a S_k - eta r_k,      s_{k+1} = p_k,

so with ``lambda_c = 0`` the translation charge obeys ``S+ = (1 - eta lambda_d) S`` whatever the momentum.

``d_k`` and ``m_{k+1}`` are recovered from the actual update ``Delta_k = -eta (d_k + lambda_d theta_k)``:
``d_k = -Delta_k / eta - lambda_d theta_k`` and ``m_{k+1} = d_k`` (heavy ball) or
``m_{k+1} = (d_k - g_k - lambda_c theta_k) / beta`` (Nesterov), so no copy of the optimiser's velocity is kept.
Adam's per-coordinate scaling breaks ``theta^T A d = 0``-type cancellations: its drift is observed, not
predicted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._kinds import REDUCED_DYNAMICS, observable
from ._util import charge_linear, charges_dict


def _polar(q_x, q_y, q_xy):
    return q_xy - q_x - q_y


@observable(REDUCED_DYNAMICS, "charge_drift_predicted")
def predict_charge_drift(
    group,
    params,
    grads,
    updates,
    cross,
    *,
    lr,
    momentum=0.0,
    nesterov: bool = False,
    weight_decay=0.0,
    coupled_weight_decay=0.0,
    charges_now=None,
    velocity=None,
):
    """The predicted drift ``Q_{k+1} - Q_k`` of every charge for SGD (module docstring), and the next cross term.

    Args:
        group: the symmetry group.
        params, grads, updates: ``theta_k``, ``g_k`` and the actual update ``Delta_k``.
        cross: ``{component: c_k}`` (zeros at the first step), the carried cross term.
        lr, momentum, weight_decay (decoupled), coupled_weight_decay: the optimiser's hyperparameters (scalars,
            possibly traced); ``nesterov`` static.
        charges_now: ``charges(params)`` when already computed.
        velocity: Nesterov only: the optimiser's momentum after this step, ``m_{k+1}`` (optax's ``TraceState.trace``).
            Without it, it is recovered from the update as ``(d - g - coupled_weight_decay theta) / momentum``, which
            assumes the momentum accumulated ``grads`` themselves (not, e.g., clipped gradients).

    Returns:
        ``(predicted drift {component: array}, next cross {component: array})``.
    """
    dt = jax.tree.leaves(params)[0].dtype
    eta = jnp.asarray(lr, dt)
    beta = jnp.asarray(momentum, dt)
    lam_d = jnp.asarray(weight_decay, dt)
    lam_c = jnp.asarray(coupled_weight_decay, dt)
    a = 1 - eta * lam_d
    safe_eta = jnp.where(eta != 0, eta, jnp.ones_like(eta))
    d = jax.tree.map(lambda u, p: -u / safe_eta - lam_d * p, updates, params)
    if nesterov and velocity is not None:
        m = velocity
    elif nesterov:
        safe_beta = jnp.where(beta != 0, beta, jnp.ones_like(beta))
        m = jax.tree.map(
            lambda dd, g, p: jnp.where(beta != 0, (dd - g - lam_c * p) / safe_beta, dd), d, grads, params
        )
    else:
        m = d
    q = charges_now if charges_now is not None else charges_dict(group, params)
    qd = charges_dict(group, d)
    if nesterov:
        qm = charges_dict(group, m)
        qdm = charges_dict(group, jax.tree.map(lambda x, y: x + y, d, m))
    lin = charge_linear(group)
    pred, new_cross = {}, {}
    for k in q:
        if lin.get(k, False):

            def one_lin(qk, c):
                p = beta * c + lam_c * qk
                r = lam_c * qk + beta * p if nesterov else p
                return (a - 1) * qk - eta * r, p

            out = jax.tree.map(one_lin, q[k], cross[k])
        else:

            def one_quad(qk, c, qdk, b_dm):
                p = beta * c + 2 * lam_c * qk
                r = 2 * lam_c * qk + beta * p if nesterov else p
                return (a * a - 1) * qk - a * eta * r + eta * eta * qdk, a * p - eta * b_dm

            b_dm = jax.tree.map(_polar, qd[k], qm[k], qdm[k]) if nesterov else jax.tree.map(lambda x: 2 * x, qd[k])
            out = jax.tree.map(one_quad, q[k], cross[k], qd[k], b_dm)
        is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
        pred[k] = jax.tree.map(lambda t: t[0], out, is_leaf=is_pair)
        new_cross[k] = jax.tree.map(lambda t: t[1], out, is_leaf=is_pair)
    return pred, new_cross
