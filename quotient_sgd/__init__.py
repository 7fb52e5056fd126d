"""quotient_sgd: symmetry-quotiented SGD dynamics and the shock-wave picture of training.

See THEORY.md for the mathematics.  The subpackages are

- :mod:`quotient_sgd.symmetry`: parameter-symmetry group actions and quotient geometry;
- :mod:`quotient_sgd.models`: Flax NNX models that declare their symmetries;
- :mod:`quotient_sgd.observables`: quotient observables (pure functions);
- :mod:`quotient_sgd.optim`: Optax wrappers and the scan-based training loop;
- :mod:`quotient_sgd.hj`: viscous Hamilton-Jacobi / Burgers engine on Diffrax;
- :mod:`quotient_sgd.diagnostics`: phase-transition detection;
- :mod:`quotient_sgd.data`: synthetic and small real data sets;
- :mod:`quotient_sgd.runner` and :mod:`quotient_sgd.config`: config-driven runs and sweeps.
"""

__version__ = "0.1.0"
