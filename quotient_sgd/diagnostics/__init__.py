"""Phase-transition diagnostics on quotient trajectories (THEORY sections 3-4).

- :func:`detect` (and the per-kind ``detect_*``): ``trajectory -> list[Event]``, kinds ``shock``, ``fold``,
  ``edge_of_stability``, ``catapult``, ``loss_spike``, ``transition`` (calibrated CUSUM), ``divergence``, in
  the variants ``quotient`` (orbit-invariant), ``step`` (what the step sees, with its decomposition), ``raw``,
  ``slice`` and ``preconditioned`` (README's detector table lists which kind has which);
- :func:`detect_run` on a run directory (writes ``events.json``), :class:`LiveDetector` on chunks;
- :func:`stability_decomposition`: ``lr * lambda_step = lr * lambda_canonical * gauge_factor`` and the charge
  prediction of the gauge factor;
- :func:`shock_aware_lr`: an Optax wrapper that keeps the live fold / shock numbers at a target.
"""

from ._cusum import Alarm as Alarm
from ._cusum import cusum as cusum
from ._cusum import cusum_threshold as cusum_threshold
from ._decomposition import gauge_transport as gauge_transport
from ._decomposition import stability_decomposition as stability_decomposition
from ._detect import ALL_KINDS as ALL_KINDS
from ._detect import adam_edge as adam_edge
from ._detect import default_transition_keys as default_transition_keys
from ._detect import detect as detect
from ._detect import detect_catapult as detect_catapult
from ._detect import detect_divergence as detect_divergence
from ._detect import detect_edge_of_stability as detect_edge_of_stability
from ._detect import detect_fold as detect_fold
from ._detect import detect_loss_spike as detect_loss_spike
from ._detect import detect_shock as detect_shock
from ._detect import detect_transition as detect_transition
from ._detect import fold_edge as fold_edge
from ._detect import fold_levels_for as fold_levels_for
from ._detect import stability_edge as stability_edge
from ._events import Event as Event
from ._events import load_events as load_events
from ._events import save_events as save_events
from ._live import LiveDetector as LiveDetector
from ._live import detect_run as detect_run
from ._shock_lr import ShockAwareState as ShockAwareState
from ._shock_lr import shock_aware_lr as shock_aware_lr

__all__ = [
    "ALL_KINDS", "Alarm", "Event", "LiveDetector", "ShockAwareState", "adam_edge", "cusum", "cusum_threshold",
    "default_transition_keys", "detect", "detect_catapult", "detect_divergence", "detect_edge_of_stability",
    "detect_fold", "detect_loss_spike", "detect_run", "detect_shock", "detect_transition", "gauge_transport",
    "fold_edge", "fold_levels_for", "load_events", "save_events", "shock_aware_lr", "stability_decomposition",
    "stability_edge",
]
