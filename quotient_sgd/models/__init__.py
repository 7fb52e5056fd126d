"""Flax NNX models that declare the parameter symmetries their structure has (THEORY section 1).

Every model has ``model.symmetries() -> quotient_sgd.symmetry.Product``; check a declaration numerically with
``quotient_sgd.symmetry.verify(model, model.symmetries(), x, key)``.
"""

from ._activations import ACTIVATIONS as ACTIVATIONS
from ._activations import HOMOGENEOUS as HOMOGENEOUS
from ._activations import check_activation as check_activation
from ._activations import is_homogeneous as is_homogeneous
from ._mlp import MLP as MLP
from ._mlp import DeepLinear as DeepLinear
from ._norm import NORM_EPS as NORM_EPS
from ._norm import BatchNorm as BatchNorm
from ._norm import LayerNorm as LayerNorm

__all__ = [
    "ACTIVATIONS", "HOMOGENEOUS", "NORM_EPS", "BatchNorm", "DeepLinear", "LayerNorm", "MLP", "check_activation",
    "is_homogeneous",
]
