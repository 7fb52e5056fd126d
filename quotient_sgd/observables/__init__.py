"""Quotient observables (THEORY sections 1-4): pure functions of ``(params, grads, updates, ...)``.

Each function declares its kind (``fn.kind``; :data:`KINDS` maps every trajectory key to its kind):

- ``"orbit_invariant"``: a function of the network function alone (equal on ``theta`` and ``g . theta``);
- ``"reduced_dynamics"``: a function of (orbit, charges), what the optimiser does on the quotient;
- ``"raw"``: parameter-space quantities reported for comparison.

:func:`quotient_sgd.optim.quotient_trajectory` evaluates them inside the optimiser step.
"""

from ._charges import predict_charge_drift as predict_charge_drift
from ._hessian import Extremes as Extremes
from ._hessian import dense_hessian as dense_hessian
from ._hessian import frozen_horizontal as frozen_horizontal
from ._hessian import projection_for as projection_for
from ._hessian import hessian_extremes as hessian_extremes
from ._hessian import hvp_operator as hvp_operator
from ._hessian import lanczos_extremes as lanczos_extremes
from ._hessian import sharpness_horizontal as sharpness_horizontal
from ._hessian import sharpness_preconditioned as sharpness_preconditioned
from ._hessian import sharpness_quotient as sharpness_quotient
from ._hessian import sharpness_raw as sharpness_raw
from ._kinds import KINDS as KINDS
from ._kinds import ORBIT_INVARIANT as ORBIT_INVARIANT
from ._kinds import RAW as RAW
from ._kinds import REDUCED_DYNAMICS as REDUCED_DYNAMICS
from ._kinds import kind_of as kind_of
from ._kinds import observable as observable
from ._noise import Noise as Noise
from ._noise import gradient_noise as gradient_noise
from ._step import angular_update as angular_update
from ._step import canonical_gradient as canonical_gradient
from ._step import charge_drift as charge_drift
from ._step import charges as charges
from ._step import directional_curvature as directional_curvature
from ._step import effective_lr as effective_lr
from ._step import fold_number as fold_number
from ._step import grad_norm as grad_norm
from ._step import grad_norm_canonical as grad_norm_canonical
from ._step import invariant_norms as invariant_norms
from ._step import shock_number as shock_number
from ._step import update_split_norms as update_split_norms

# The loss is passed in by the caller (the training step already has it); it is a function of the network
# function alone.
KINDS["loss"] = ORBIT_INVARIANT
KINDS["hessian_step"] = RAW  # bookkeeping: the step at which the Hessian observables were last refreshed
# Keys of a trajectory that no observable computes: ``train(..., has_aux=True)``'s ``aux`` (whatever loss_fn returns
# beside the loss: nothing says it is a function of the network function, so it is never trusted as one) and
# the step index a run directory's trajectory.npz holds (bookkeeping, as hessian_step)
KINDS["aux"] = RAW
KINDS["step"] = RAW
KINDS["hessian_top_quotient"] = ORBIT_INVARIANT
KINDS["hessian_bottom_quotient"] = ORBIT_INVARIANT
KINDS["hessian_top_horizontal"] = REDUCED_DYNAMICS
KINDS["hessian_bottom_horizontal"] = REDUCED_DYNAMICS
KINDS["hessian_top_raw"] = RAW
KINDS["hessian_bottom_raw"] = RAW
KINDS["hessian_top_preconditioned"] = RAW
KINDS["hessian_bottom_preconditioned"] = RAW
KINDS["shock_number_hessian"] = REDUCED_DYNAMICS
KINDS["fold_number_hessian"] = REDUCED_DYNAMICS

__all__ = [
    "KINDS", "ORBIT_INVARIANT", "RAW", "REDUCED_DYNAMICS", "Extremes", "Noise", "angular_update",
    "canonical_gradient", "charge_drift", "charges", "dense_hessian", "directional_curvature", "effective_lr",
    "fold_number", "frozen_horizontal", "gradient_noise", "grad_norm", "grad_norm_canonical", "hessian_extremes",
    "hvp_operator", "invariant_norms", "kind_of", "lanczos_extremes", "observable", "predict_charge_drift",
    "projection_for", "shock_number",
    "sharpness_horizontal", "sharpness_preconditioned", "sharpness_quotient", "sharpness_raw", "update_split_norms",
]
