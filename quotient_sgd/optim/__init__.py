"""Optax wrappers that see the symmetry, and the scan-based training loop (THEORY sections 1-4).

- :func:`quotient_trajectory`: record quotient observables while any optimiser trains
  (:func:`observables_of`, :func:`eigenvectors_of`; :class:`SGDSpec` for the charge-drift prediction;
  :func:`adam_preconditioner` for Adam's preconditioned sharpness);
- :func:`horizontal`: project updates onto the horizontal space;
- :func:`gauge_fix`: run the optimiser on the canonical section;
- :func:`train`: one jitted ``lax.scan`` over steps, vmap-able over seeds and injected hyperparameters
  (:func:`set_hyperparams`, :func:`member_axes`).
"""

from ._adam import adam_preconditioner as adam_preconditioner
from ._gauge import GaugeFixState as GaugeFixState
from ._gauge import HorizontalState as HorizontalState
from ._gauge import gauge_fix as gauge_fix
from ._gauge import gauge_fix_elements as gauge_fix_elements
from ._gauge import horizontal as horizontal
from ._spec import SGDSpec as SGDSpec
from ._spec import injected_hyperparams as injected_hyperparams
from ._spec import member_axes as member_axes
from ._spec import set_hyperparams as set_hyperparams
from ._train import train as train
from ._trajectory import DEFAULT_OBSERVABLES as DEFAULT_OBSERVABLES
from ._trajectory import QuotientTrajectoryState as QuotientTrajectoryState
from ._trajectory import eigenvectors_of as eigenvectors_of
from ._trajectory import flatten_trajectory as flatten_trajectory
from ._trajectory import observables_of as observables_of
from ._trajectory import quotient_trajectory as quotient_trajectory

__all__ = [
    "DEFAULT_OBSERVABLES", "GaugeFixState", "HorizontalState", "QuotientTrajectoryState", "SGDSpec",
    "adam_preconditioner", "eigenvectors_of",
    "flatten_trajectory", "gauge_fix", "gauge_fix_elements", "horizontal", "injected_hyperparams", "member_axes",
    "observables_of", "quotient_trajectory", "set_hyperparams", "train",
]
