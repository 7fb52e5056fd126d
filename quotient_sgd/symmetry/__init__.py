"""Parameter-symmetry group actions and the quotient geometry they induce (THEORY sections 1-2).

A model's group is a :class:`Product` of components acting on named parameter paths; every component offers
``sample / act / inverse / compose / tangents / vertical / horizontal / canonicalize / invariants / charges``.
"""

from ._align import align as align
from ._align import quotient_distance as quotient_distance
from ._base import Group as Group
from ._base import SymmetryError as SymmetryError
from ._base import generic_vcoeffs as generic_vcoeffs
from ._base import gram_matrix as gram_matrix
from ._gl import GL as GL
from ._permutation import Permutation as Permutation
from ._product import Product as Product
from ._product import Word as Word
from ._rescale import Rescale as Rescale
from ._scale import Scale as Scale
from ._translation import Translation as Translation
from ._verify import verify as verify
from ._vertical import vertical_generic as vertical_generic

__all__ = [
    "GL", "Group", "Permutation", "Product", "Rescale", "Scale", "SymmetryError", "Translation", "Word",
    "align", "generic_vcoeffs", "gram_matrix", "quotient_distance", "verify", "vertical_generic",
]
