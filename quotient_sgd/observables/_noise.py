"""Gradient-noise temperature on the horizontal space (THEORY section 3, "Mapping SGD onto (t, nu)")."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .._tree import widen
from ._kinds import REDUCED_DYNAMICS, observable
from ._util import check_hyper


class Noise(NamedTuple):
    sigma2: jax.Array  #: per-example gradient variance per horizontal dimension
    temperature: jax.Array  #: T = eta sigma^2 / (2 B)
    viscosity: jax.Array  #: nu = T / 2


@observable(REDUCED_DYNAMICS, "noise_sigma2", "temperature", "viscosity")
def gradient_noise(example_loss_fn: Callable, group, params, *, lr) -> Noise:
    """Per-example gradient noise projected on the horizontal space at ``params``, and the SGD temperature.

    ``example_loss_fn(params) -> (B,)`` per-example losses of the step's batch (mean = the batch loss).
    ``sigma^2 = sum_i |P_h (g_i - g_mean)|^2 / ((B - 1) d_h)`` with ``d_h = P - (number of group generators)``;
    ``T = eta sigma^2 / (2 B)`` (Chaudhari & Soatto 2018, isotropic average) and the default viscosity
    ``nu = T / 2``.  This mapping is a modelling choice (THEORY section 3); cost: ``B`` per-example gradients.
    With ``B = 1`` the sample variance is undefined: all three are NaN.

    Limitation: ``d_h`` counts the generators, which is the orbit's dimension only where they are independent.  A
    deep linear chain wider than its ends is not (``DeepLinear(3, (4, 5), 2)``: 41 GL generators, orbit dimension
    36 of 42 parameters), and there ``d_h`` is too small (1 instead of 6: ``sigma^2``, ``T`` and ``nu``
    six times too large); the rank of the tangents would cost ``count^2 P`` a call.

    Raises:
        TypeError / ValueError: ``lr`` not one real number, or (when concrete) negative or not finite.
    """
    from ._hessian import check_hessian_args

    check_hessian_args("gradient_noise", example_loss_fn, group, with_group=True, fn="example_loss_fn",
                       returns="(B,) per-example losses")
    check_hyper("gradient_noise", "lr", lr)
    shape = jax.eval_shape(example_loss_fn, params).shape
    if len(shape) != 1:
        # a scalar (the mean loss) would make jacrev's output the gradient itself, whose first leaf's leading axis
        # was then taken for the batch: an unrelated vmap error, or a silently wrong sigma^2 when all leaves agree
        raise ValueError(f"gradient_noise: example_loss_fn must return the per-example losses, shape (B,), got shape "
                         f"{shape} (for quotient_sgd.optim.train: example_loss_fn=(params, batch) -> (B,), not the "
                         f"mean loss)")
    # the per-example gradients of low-precision (bfloat16 / float16) parameters are projected and summed in float32
    # (widen), as quotient_trajectory's: in float16 their squared deviations overflowed, in bfloat16 the sums rounded
    per_ex = widen(jax.jacrev(example_loss_fn)(params))
    b = jax.tree.leaves(per_ex)[0].shape[0]
    wide = widen(params)
    hor = jax.vmap(lambda g: group.horizontal(wide, g))(per_ex)
    # leaves of several dtypes (float32 blocks beside float64 ones) are joined in their common one, whatever
    # jax_numpy_dtype_promotion is (under "strict" ravel_pytree failed with a bare TypePromotionError)
    with jax.numpy_dtype_promotion("standard"):
        flat = jax.vmap(lambda t: ravel_pytree(t)[0])(hor)
        n_vert = jax.tree.leaves(jax.eval_shape(group.tangents, params))
    centred = flat - jnp.mean(flat, axis=0, keepdims=True)
    n_params = flat.shape[1]
    n_vert = n_vert[0].shape[0] if n_vert else 0
    d_h = max(n_params - n_vert, 1)
    sigma2 = jnp.sum(jnp.square(centred)) / jnp.asarray((max(b - 1, 1)) * d_h, flat.dtype)
    if b < 2:  # one example has no sample variance: NaN, not the 0 that its zero deviation from itself gives
        sigma2 = jnp.full((), jnp.nan, flat.dtype)
    temp = jnp.asarray(lr, flat.dtype) * sigma2 / jnp.asarray(2 * b, flat.dtype)
    return Noise(sigma2, temp, temp / 2)
