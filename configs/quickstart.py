"""The quickstart config: a small ReLU MLP on scikit-learn's digits (the default of ``quotient-sgd run``).

The definition ships inside the package (``quotient_sgd/config/quickstart.py``) so that ``quotient-sgd run``
works from any directory; this file re-exports it.
"""

from quotient_sgd.config.quickstart import get_config  # noqa: F401
