"""Mini-batches of the runner's scan loop: :func:`quotient_sgd.data.batch_fn` with ``sampler="top_k"``.

A uniformly random subset of the training set per step, drawn on device as the positions of the ``b`` largest of
``n`` i.i.d. uniforms.  A full permutation (the library default, kept for the experiments' recorded draws) is a
sort of the whole training set at every step; on XLA:CPU that sort dominated the step of the models the runner is
used with (measured: 170 us for the 1348 digits, 510 us for 2048 examples, against 20-45 us for ``top_k``; a
64-32-10 MLP step is ~15 us), and it does not get cheaper per member when a sweep batches members.  The prefix
property holds (a batch-size sweep draws the largest batch once and masks it).
"""

from __future__ import annotations

import functools

from .. import data as qdata

#: ``sample_indices(key, n, size)`` as the runner draws them.
sample_indices = functools.partial(qdata.sample_indices, sampler="top_k")
#: ``batch_fn(dataset, batch_size, *, max_batch_size=None)`` as the runner builds it.
batch_fn = functools.partial(qdata.batch_fn, sampler="top_k")
