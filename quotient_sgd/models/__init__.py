"""Flax NNX models that declare the parameter symmetries their structure has (THEORY section 1).

Every model has ``model.symmetries() -> quotient_sgd.symmetry.Product``; check a declaration numerically with
``quotient_sgd.symmetry.verify(model, model.symmetries(), x, key)``.  The mean-field network's permutation
quotient is the empirical measure of its particles: :func:`particles`, :func:`particle_moments`, :func:`mmd`.
"""

from ._activations import ACTIVATIONS as ACTIVATIONS
from ._activations import HOMOGENEOUS as HOMOGENEOUS
from ._activations import check_activation as check_activation
from ._activations import is_homogeneous as is_homogeneous
from ._cnn import CNN as CNN
from ._meanfield import MeanField as MeanField
from ._meanfield import mmd as mmd
from ._meanfield import particle_moments as particle_moments
from ._meanfield import particles as particles
from ._mlp import MLP as MLP
from ._mlp import DeepLinear as DeepLinear
from ._norm import NORM_EPS as NORM_EPS
from ._norm import BatchNorm as BatchNorm
from ._norm import LayerNorm as LayerNorm
from ._transformer import CausalSelfAttention as CausalSelfAttention
from ._transformer import Transformer as Transformer

__all__ = [
    "ACTIVATIONS", "CNN", "HOMOGENEOUS", "NORM_EPS", "BatchNorm", "CausalSelfAttention", "DeepLinear", "LayerNorm",
    "MLP", "MeanField", "Transformer", "check_activation", "is_homogeneous", "mmd", "particle_moments", "particles",
]
