"""Mini-batches of the runner's scan loop: :func:`quotient_sgd.data.batch_fn` with ``sampler="swap_or_not"``.

A pseudo-random subset of the training set per step, drawn on device as the images of ``0 .. b - 1`` under a
swap-or-not permutation of the ``n`` examples (:func:`quotient_sgd.data.swap_or_not`): distinct by construction,
within 1e-6 in total variation of a uniformly random subset in random order for batches of up to ``n / 4``, and
``O(b)`` work per step whatever ``n``.  A full permutation (the library default, kept for the experiments'
recorded draws) is a sort of the whole training set at every step, and ``top_k`` of ``n`` uniforms is ``O(n)``;
on XLA:CPU they cost 170 us and 18 us a step for the 1348 digits (226 us for ``top_k`` on 60000 examples), where a
64-32-10 MLP step is ~15 us, and neither gets cheaper per member when a sweep batches members (16 members: 240 us
for ``top_k``, 50 us for swap-or-not).  The prefix property holds (a batch-size sweep draws the largest batch once
and masks it).
"""

from __future__ import annotations

import functools

from .. import data as qdata

#: ``sample_indices(key, n, size)`` as the runner draws them.
sample_indices = functools.partial(qdata.sample_indices, sampler="swap_or_not")
#: ``batch_fn(dataset, batch_size, *, max_batch_size=None)`` as the runner builds it.
batch_fn = functools.partial(qdata.batch_fn, sampler="swap_or_not")
