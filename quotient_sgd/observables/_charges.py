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
**Masked weight decay.**  When the decays act only on some leaves (``optax.add_decayed_weights(lam, mask=...)``,
e.g. none on biases), write ``M`` for the 0/1 projection onto those leaves and ``w_k = M theta_k``:

    m_{k+1} = beta m_k + g_k + lambda_c w_k,     theta_{k+1} = theta_k - eta (d_k + lambda_d w_k).

The same algebra, with ``B(theta_k, w_k)`` no longer equal to ``2 Q_k``, gives with ``p_k = beta c_k +
lambda_c B(theta_k, w_k)`` and ``r_k = p_k`` (heavy ball) or ``lambda_c B(theta_k, w_k) + beta p_k`` (Nesterov):

    Q_{k+1} = Q_k - eta lambda_d B(theta_k, w_k) - eta r_k + eta^2 Q(d_k + lambda_d w_k)          (exact)
    c_{k+1} = p_k - eta lambda_d B(w_k, m_{k+1}) - eta B(d_k, m_{k+1}),

which is the recursion above when ``w_k = theta_k``; for a linear charge ``S_{k+1} = S_k - eta lambda_d S(w_k) -
eta r_k`` and ``s_{k+1} = p_k`` with ``lambda_c S(w_k)`` in place of ``lambda_c S_k``.  A decay that is masked per
component (the rescale unit's incoming kernel decayed, its outgoing one not) thus moves the charge by the bilinear
term ``B(theta, w)`` of the parameters and their decayed part.

Adam's per-coordinate scaling breaks ``theta^T A d = 0``-type cancellations: its drift is observed, not
predicted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._kinds import REDUCED_DYNAMICS, observable
from .._tree import float_dtype, widen
from ._util import charge_linear, charges_dict, check_hyper, check_like


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
    decay_mask=None,
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
        decay_mask: ``None`` (both decays act on every parameter), or a pytree of booleans with the structure of
            ``params`` (or a prefix of it), ``True`` where the decays act (optax's ``mask``), or a function
            ``params -> such a pytree`` (as :class:`~quotient_sgd.optim.SGDSpec` and optax take it): the masked
            recursion of the module docstring.

    Returns:
        ``(predicted drift {component: array}, next cross {component: array})``.

    Raises:
        TypeError / ValueError: a hyperparameter that is not one real number, or (when concrete) negative or not
            finite; ``nesterov`` not a bool; ``grads``, ``updates`` or ``velocity`` not like ``params``;
            ``charges_now`` or ``cross`` not one entry per charge; ``decay_mask`` not booleans.
    """
    # (nesterov="no", truthy, ran the Nesterov recursion; a mask of numbers decayed every leaf whose entry was not 0;
    # grads missing leaves was accepted; updates, velocity, charges_now or a function mask of another kind failed
    # with a bare pytree structure error, KeyError or "not a valid JAX array type", naming none of them)
    if not isinstance(nesterov, (bool, np.bool_)):
        raise TypeError(f"predict_charge_drift: nesterov must be True or False (it selects the recursion), got "
                        f"{nesterov!r}")
    check_like("predict_charge_drift", "params", params, grads=grads, updates=updates,
               **({} if velocity is None else {"velocity": velocity}))
    if decay_mask is not None and callable(decay_mask):
        decay_mask = decay_mask(params)
    if decay_mask is not None:
        leaves = jax.tree.leaves(decay_mask)
        if not leaves or any(not (isinstance(x, (bool, np.bool_)) or getattr(x, "dtype", None) == jnp.bool_)
                             for x in leaves):
            raise TypeError(f"predict_charge_drift: decay_mask must be None, a pytree of booleans (True where the "
                            f"decays act) with the structure of params or a prefix of it, or a function params -> "
                            f"such a pytree, got {decay_mask!r}")
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                        ("coupled_weight_decay", coupled_weight_decay)):
        check_hyper("predict_charge_drift", name, value)
    want = jax.tree.structure(jax.eval_shape(lambda p: charges_dict(group, p), params))
    if charges_now is not None and jax.tree.structure(charges_now) != want:
        raise ValueError(f"predict_charge_drift: charges_now must be charges(group, params) (one entry per charge), "
                         f"or None:\n  expected {want}\n  got      {jax.tree.structure(charges_now)}")
    if jax.tree.structure(cross) != want:
        # a cross term of other components (or {} for "none yet") failed with a bare KeyError of a component's name
        raise ValueError(f"predict_charge_drift: cross must hold one c_k per charge, like charges(group, params) "
                         f"(zeros at the first step: jax.tree.map(jnp.zeros_like, charges(group, params))):\n  "
                         f"expected {want}\n  got      {jax.tree.structure(cross)}")
    # bfloat16 / float16 arguments are computed in float32, as the step observables are (quotient_trajectory widens
    # them before calling this): in their own dtype the learning rate was rounded to it (0.01 -> 0.01001 in
    # bfloat16, the prediction 3.5e-3 off the float64 one from the same numbers) and so was -Delta / eta
    params, grads, updates, cross = widen((params, grads, updates, cross))
    velocity = None if velocity is None else widen(velocity)
    charges_now = None if charges_now is None else widen(charges_now)
    # the hyperparameters in the parameters' common dtype, cast to each leaf's / charge's dtype where they meet it
    # (float32 blocks beside float64 ones: the first leaf's dtype rounded a float64 block's learning rate to float32)
    dt = float_dtype(params)
    eta = jnp.asarray(lr, dt)
    beta = jnp.asarray(momentum, dt)
    lam_d = jnp.asarray(weight_decay, dt)
    lam_c = jnp.asarray(coupled_weight_decay, dt)
    a = 1 - eta * lam_d
    safe_eta = jnp.where(eta != 0, eta, jnp.ones_like(eta))
    masked = decay_mask is not None
    w = masked_leaves(decay_mask, params) if masked else params  # the decayed part M theta
    d = jax.tree.map(lambda u, x: -u / _as(safe_eta, u) - _as(lam_d, x) * x, updates, w)
    if nesterov and velocity is not None:
        m = velocity
    elif nesterov:
        safe_beta = jnp.where(beta != 0, beta, jnp.ones_like(beta))
        m = jax.tree.map(lambda dd, g, x: jnp.where(beta != 0, (dd - g - _as(lam_c, x) * x) / _as(safe_beta, dd), dd),
                         d, grads, w)
    else:
        m = d
    add = lambda x, y: jax.tree.map(lambda a_, b_: a_ + b_, x, y)  # noqa: E731
    q = charges_now if charges_now is not None else charges_dict(group, params)
    qd = charges_dict(group, d)
    qm = charges_dict(group, m) if nesterov else qd
    b_dm = jax.tree.map(_polar, qd, qm, charges_dict(group, add(d, m))) if nesterov else jax.tree.map(
        lambda x: 2 * x, qd)
    if masked:  # the bilinear terms of the masked recursion (module docstring); without a mask B(theta, w) = 2 Q
        qw = charges_dict(group, w)
        b_tw = jax.tree.map(_polar, q, qw, charges_dict(group, add(params, w)))
        q_step = charges_dict(group, jax.tree.map(lambda dd, x: dd + _as(lam_d, x) * x, d, w))
        b_wm = jax.tree.map(_polar, qw, qm, charges_dict(group, add(w, m)))
    lin = charge_linear(group)
    scalars = (eta, beta, lam_d, lam_c, a)

    def hyper(ref):  # (eta, beta, lam_d, lam_c, a) in the dtype of the charge they meet
        return tuple(_as(x, ref) for x in scalars)

    pred, new_cross = {}, {}
    for k in q:
        if lin.get(k, False) and masked:  # qw[k] = S(w), linear

            def one_lin_masked(c, sw):
                eta, beta, lam_d, lam_c, a = hyper(c)
                p = beta * c + lam_c * sw
                r = lam_c * sw + beta * p if nesterov else p
                return -eta * lam_d * sw - eta * r, p

            out = jax.tree.map(one_lin_masked, cross[k], qw[k])
        elif lin.get(k, False):

            def one_lin(qk, c):
                eta, beta, lam_d, lam_c, a = hyper(qk)
                p = beta * c + lam_c * qk
                r = lam_c * qk + beta * p if nesterov else p
                return -eta * lam_d * qk - eta * r, p  # (a - 1 = -eta lam_d, not formed from the rounded a)

            out = jax.tree.map(one_lin, q[k], cross[k])
        elif masked:

            def one_quad_masked(c, btw, qs, bwm, bdm):
                eta, beta, lam_d, lam_c, a = hyper(c)
                p = beta * c + lam_c * btw
                r = lam_c * btw + beta * p if nesterov else p
                return eta * eta * qs - eta * lam_d * btw - eta * r, p - eta * lam_d * bwm - eta * bdm

            out = jax.tree.map(one_quad_masked, cross[k], b_tw[k], q_step[k], b_wm[k], b_dm[k])
        else:

            def one_quad(qk, c, qdk, bdm):
                eta, beta, lam_d, lam_c, a = hyper(qk)
                p = beta * c + 2 * lam_c * qk
                r = 2 * lam_c * qk + beta * p if nesterov else p
                # a^2 - 1 = -eta lam_d (2 - eta lam_d), not formed from a = 1 - eta lam_d: rounded to the dtype,
                # a carries an error of eps / 2, which a^2 - 1 ~ -2 eta lam_d keeps (float32, eta lam_d = 1e-6:
                # the decay's drift 3% off, the predicted drift 2% off the observed one)
                decay = -eta * lam_d * (2 - eta * lam_d)
                return decay * qk - a * eta * r + eta * eta * qdk, a * p - eta * bdm

            out = jax.tree.map(one_quad, q[k], cross[k], qd[k], b_dm[k])
        is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
        pred[k] = jax.tree.map(lambda t: t[0], out, is_leaf=is_pair)
        new_cross[k] = jax.tree.map(lambda t: t[1], out, is_leaf=is_pair)
    return pred, new_cross


def _as(x, ref):
    """The scalar ``x`` in the dtype of the array ``ref``."""
    return jnp.asarray(x).astype(jnp.result_type(ref))


def masked_leaves(mask, params):
    """``M theta``: ``params`` with the leaves where ``mask`` (a pytree of booleans, or a prefix of ``params``'
    structure, as optax's ``mask``) is ``False`` set to zero."""
    try:
        return jax.tree.map(
            lambda m, sub: jax.tree.map(lambda p: jnp.where(jnp.asarray(m), p, jnp.zeros_like(p)), sub),
            mask, params)
    except ValueError as e:
        raise ValueError(f"decay_mask must be a pytree of booleans with the structure of params (or a prefix of "
                         f"it), True where the weight decay acts: {e}") from e

