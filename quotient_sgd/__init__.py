"""quotient_sgd: symmetry-quotiented SGD dynamics and the shock-wave picture of training.

The mathematics is in the "The mathematics" section of README.md; docstrings cite its sections as "THEORY
section N".  The subpackages are

- :mod:`quotient_sgd.symmetry`: parameter-symmetry group actions and quotient geometry;
- :mod:`quotient_sgd.models`: Flax NNX models that declare their symmetries;
- :mod:`quotient_sgd.observables`: quotient observables (pure functions);
- :mod:`quotient_sgd.optim`: Optax wrappers and the scan-based training loop;
- :mod:`quotient_sgd.hj`: viscous Hamilton-Jacobi / Burgers engine on Diffrax;
- :mod:`quotient_sgd.diagnostics`: phase-transition detection;
- :mod:`quotient_sgd.data`: synthetic and small real data sets;
- :mod:`quotient_sgd.runner` and :mod:`quotient_sgd.config`: config-driven runs and sweeps.
"""

import os as _os

__version__ = "0.1.0"

# XLA:CPU's concurrency-optimized scheduler deadlocks (all runtime threads parked, no progress) on some graphs
# this package builds -- observed with jax/jaxlib 0.10.2 on the jitted canonicalisation of a two-block
# Transformer's symmetry group, which completes in seconds with the scheduler off.  XLA reads XLA_FLAGS when the
# backend starts, so the flag takes effect when quotient_sgd is imported before JAX runs anything.
# Set QSGD_KEEP_XLA_SCHEDULER=1 to leave XLA_FLAGS untouched.
_XLA_FIX = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if _os.environ.get("QSGD_KEEP_XLA_SCHEDULER") != "1" and "xla_cpu_enable_concurrency_optimized_scheduler" not in (
    _os.environ.get("XLA_FLAGS", "")
):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " " + _XLA_FIX).strip()
