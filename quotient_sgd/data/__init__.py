"""Data sets for quotient_sgd runs: synthetic tasks and small real data shipped by a dependency.

- :func:`teacher_student` (regression), :func:`modular_arithmetic` (``a + b mod p``, one-hot pairs for an MLP or
  token sequences for a Transformer), :func:`sparse_parity`, :func:`digits` (scikit-learn's 8x8 images);
  each deterministic per ``seed`` with a train/test split, returned as a :class:`Dataset` on device.
- :func:`batch_fn`: ``(step, key) -> batch`` sampled on device inside ``lax.scan`` (or the full batch), by one of
  :data:`SAMPLERS` (:func:`sample_indices`; :func:`swap_or_not` draws a batch in ``O(batch)`` work);
  :func:`full_batch` for evaluation.
"""

from ._dataset import SAMPLERS as SAMPLERS
from ._dataset import TASKS as TASKS
from ._dataset import Dataset as Dataset
from ._dataset import batch_fn as batch_fn
from ._dataset import full_batch as full_batch
from ._dataset import make_dataset as make_dataset
from ._dataset import sample_indices as sample_indices
from ._dataset import swap_or_not as swap_or_not
from ._dataset import swap_or_not_bound as swap_or_not_bound
from ._dataset import swap_or_not_rounds as swap_or_not_rounds
from ._tasks import GENERATORS as GENERATORS
from ._tasks import digits as digits
from ._tasks import modular_arithmetic as modular_arithmetic
from ._tasks import sparse_parity as sparse_parity
from ._tasks import teacher_student as teacher_student

__all__ = [
    "GENERATORS", "SAMPLERS", "TASKS", "Dataset", "batch_fn", "digits", "full_batch", "make_dataset",
    "modular_arithmetic", "sample_indices", "sparse_parity", "swap_or_not", "swap_or_not_bound", "swap_or_not_rounds",
    "teacher_student",
]
