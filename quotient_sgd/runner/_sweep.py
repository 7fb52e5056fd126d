"""``sweep``: the config's sweep as one vmapped, jitted program, sharded over every device of every host.

Members differ by ``seed`` (initialisation and batch order), ``lr`` / ``weight_decay`` / ``momentum`` (injected
hyperparameters in the optimiser state: no recompilation per value), ``init_gauge`` (scale of the random
re-gauging at init) and ``batch_size`` (the largest batch is drawn and smaller ones are masked prefixes, see
:mod:`quotient_sgd.runner._batches`).  The member axis is sharded over a 1-D ``jax.sharding.Mesh`` of all devices
(``jax.devices()`` spans every process after ``jax.distributed.initialize``); each process writes the run
directories of the members that live on its devices.

Members advance chunk by chunk together.  The first chunk runs one member per device (on one device without
padding, through the very program a single ``run`` compiles, shared across members; over several devices, the
sharded program with one member on each); what it cost then decides the rest
(:func:`choose_members_per_device`): batching a small model's members amortises per-step overhead (many times
faster than a loop over runs) once the sweep is long enough to pay for compiling the batched program, while a
model whose step already fills the cores keeps running one member at a time, so a sweep is never slower than
its members run one after another.  After every chunk of ``checkpoint.every`` steps each member's rows are
written (while the next chunk computes) and *one* orbax checkpoint holds every member's state, so a sweep
killed at any moment resumes from its last checkpoint, like a run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import math
import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .._durable import durable_write
from ..config import SWEEP_AXES, ConfigError, Settings, SweepSettings, from_dict, unused_keys
from ..optim import flatten_trajectory, member_axes
from ._batches import batch_fn
from ._build import (Built, batch_key, build, check_init_gauge, init_model, make_inner_optimizer, require_max_chunks,
                     require_settings)
from ._chunk import (
    chunk_step,
    eval_program,
    evaluation,
    init_program,
    single_programs,
    to_host,
    to_host_finish,
    to_host_start,
)
from ._memory import state_shapes as _state_shapes
from ._memory import sweep_members_cap
from ._run import (
    _tensorboard,
    chunk_bounds,
    first_divergence,
    first_missing_part,
    lost_trajectory,
    mend_metrics,
    require_tensorboard,
    resume_point,
    scalar_rows,
    write_tensorboard,
)
from ._rundir import (
    SWEEP_REPORT_KEYS,
    Checkpoints,
    MetricsLog,
    RunDirError,
    TrajectoryParts,
    _flat,
    check_directory_path,
    check_not_inside_outputs,
    check_trajectory_loaded,
    checkpoint_steps,
    config_diff,
    directory_path,
    discard_new_run,
    finished_trajectory,
    foreign_entries,
    lock_directory,
    make_directory,
    outputs_lock,
    read_divergence,
    read_record_json,
    remove_outputs,
    sigint_deferred,
    unlock_directory,
    warn_absent_defaults,
    write_config,
    write_json,
)


@dataclasses.dataclass
class SweepResult:
    workdir: str
    num_members: int
    members: list[dict]
    member_dirs: list[str]
    diverged: dict[int, dict]
    members_per_device: int
    num_devices: int
    wall_s: float
    resumed_from: int = 0
    steps_done: int = 0
    measured_cost: dict = dataclasses.field(default_factory=dict)
    schedule: list = dataclasses.field(default_factory=list)
    #: False when the call found the sweep finished on other devices and wrote nothing
    wrote: bool = True


def sweep_members(s: Settings) -> list[dict[str, Any]]:
    """The members of ``s.sweep``: ``[{axis: value}, ...]`` (product or zip of the non-empty axes).  ``s``: a
    :class:`~quotient_sgd.config.Settings` (``quotient_sgd.config.validate(config)``); anything else raises
    ``TypeError`` (a ``ConfigDict`` failed in a bare ``AttributeError: 'axes'``)."""
    require_settings(s, "sweep_members", "s")
    axes = s.sweep.axes()
    if not axes:
        return [{}]
    names = list(axes)
    combos = itertools.product(*axes.values()) if s.sweep.mode == "product" else zip(*axes.values())
    return [dict(zip(names, c)) for c in combos]


def num_members(s: Settings) -> int:
    """How many members :func:`sweep_members` lists, by arithmetic (the product of the axes' lengths, or their
    common length under ``zip``; 1 without axes)."""
    lens = [len(v) for v in s.sweep.axes().values()]
    if not lens:
        return 1
    return math.prod(lens) if s.sweep.mode == "product" else min(lens)


def member_settings(s: Settings, i: int, member: dict) -> Settings:
    """The plain run a member is: the sweep's settings with the member's values, and no sweep."""
    m = s.replace(**{SWEEP_AXES[a]: v for a, v in member.items()})
    return dataclasses.replace(m, name=f"{s.name}-{i:03d}", sweep=SweepSettings())


# ---- programs ------------------------------------------------------------------------------------------------


def _state_axes(b: Built):
    """vmap axes of ``(params, opt_state, model_state)``: 0 everywhere except integer step counters, which are
    identical for every member and stay unbatched.  That keeps the ``lax.cond`` of periodic observables
    (``count % every``, Hessian every K steps) a real branch under ``vmap`` instead of a ``select`` that would
    evaluate the expensive branch at every step for every member (``tests/test_runner_sweep.py`` checks the
    compiled program)."""
    return member_axes(_state_shapes(b))


def _per_device(body, batched_args: tuple, out_axes):
    """The computation of a device's members: ``body(*args, single=True)``, one member's unbatched computation
    (``body`` then puts the member axis back on what it returns), when the device holds one member, else
    ``jax.vmap(body(..., single=False))`` over them.  ``batched_args``: per argument, its vmap axes (``None``: shared
    by every member); ``out_axes``: those of the outputs.

    A vmapped program over one member is not the unbatched program: XLA (at its default optimisation level)
    compiles its size-1 member axis into other kernels (a sum written as a GEMV, :mod:`quotient_sgd._reduce`, among
    them), so the observables of a member run one per device over several devices (the first chunk of every sweep
    on more than one device) differed from those of its own ``run`` by float32 rounding (the tiny config's
    ``grad_norm`` by 1.2e-7, its curvature by 1.2e-5 relative; parameters and losses equal), while a member in a
    group of two or more on a device, or alone on one device, equalled its run bit for bit.  Computed this way, a
    member run alone on a device is its run bit for bit on CPU whatever the device count
    (``tests/test_runner_probe23.py``); a member vmapped with others is its run bit for bit where XLA compiles the
    model's batched gradient into the same arithmetic as the unbatched one (the tiny MLP), not in general: the
    grokking Transformer (``configs/grokking.py``, ``data.p = 7``, ``model.d_model = 8``) vmapped over two members
    has gradients differing from the unbatched ones by up to 1.5e-8 at initialisation (loss equal), and six
    members on one device ended 20 steps with losses 2.4e-7 from their runs' (the Hessian extremes 1e-6
    relative)."""
    def one(a, ax):  # (the only member of argument ``a``, of vmap axes ``ax``)
        if ax is None:
            return a
        return jax.tree.map(lambda k, v: v if k is None else v[0], ax, a, is_leaf=lambda k: k is None)

    def count(args) -> int:  # (the members this device holds: the length of the first batched leaf)
        return next(n for a, ax in zip(args, batched_args) if ax is not None
                    for n in jax.tree.leaves(jax.tree.map(lambda k, v: None if k is None else v.shape[0], ax, a,
                                                          is_leaf=lambda k: k is None)))

    def local(*args):
        if count(args) == 1:
            return body(*(one(a, ax) for a, ax in zip(args, batched_args)), single=True)
        return jax.vmap(functools.partial(body, single=False), in_axes=batched_args, out_axes=out_axes)(*args)

    return local


def _gauges(s: Settings) -> list[tuple[str, float, list[int]]]:
    """``(key, init_gauge, seeds)`` of the members' re-gauging (:func:`~._build.check_init_gauge`): each value of
    ``sweep.init_gauge`` (else ``init_gauge``) with the seeds of its members, eight at most (the members are not
    listed: a product may be huge)."""
    seeds = list(s.sweep.seed) or [s.seed]
    if not s.sweep.init_gauge:
        return [("init_gauge", s.init_gauge, seeds[:8])]
    if s.sweep.mode == "zip" and s.sweep.seed:
        by: dict[float, list[int]] = {}
        for seed, g in zip(s.sweep.seed, s.sweep.init_gauge):
            by.setdefault(g, []).append(seed)
        return [("sweep.init_gauge", g, v[:8]) for g, v in by.items()]
    return [("sweep.init_gauge", g, seeds[:8]) for g in s.sweep.init_gauge]


def _specs(axes):
    """The ``shard_map`` specs of a tree with vmap axes ``axes``: the member axis sharded, shared leaves whole."""
    return jax.tree.map(lambda a: P() if a is None else P("sweep"), axes, is_leaf=lambda a: a is None)


@functools.lru_cache(maxsize=32)
def sweep_programs(b: Built, num_steps: int, padded_batch: int | None, mesh: Mesh):
    """The jitted ``chunk(state, seed, batch_size, dataset, start)`` of a group of members (:func:`~._chunk.
    chunk_step` of each) with the member axis sharded over ``mesh``: on each device the unbatched program of a
    single run for one member, ``jax.vmap`` of it for several (:func:`_per_device`)."""
    mem, rep = NamedSharding(mesh, P("sweep")), NamedSharding(mesh, P())
    axes = _state_axes(b)
    shard = jax.tree.map(lambda a: rep if a is None else mem, axes, is_leaf=lambda a: a is None)
    bs_axis = 0 if padded_batch is not None else None

    def body(state, seed, batch_size, dataset, start, *, single):
        state, traj, ev = chunk_step(b, num_steps, padded_batch, state, seed, batch_size, dataset, start)
        if single:  # (the member axis back on every leaf but the shared counters)
            state = jax.tree.map(lambda v, k: v if k is None else v[None], state, axes, is_leaf=lambda v: v is None)
            traj, ev = jax.tree.map(lambda v: v[None], traj), jax.tree.map(lambda v: v[None], ev)
        return state, traj, ev

    local = _per_device(body, (axes, 0, bs_axis, None, None), (axes, 0, 0))
    spec = _specs(axes)
    program = jax.shard_map(local, mesh=mesh, in_specs=(spec, P("sweep"), P("sweep") if bs_axis is not None else None,
                                                        P(), P()),
                            out_specs=(spec, P("sweep"), P("sweep")), check_vma=False)
    return jax.jit(program, in_shardings=(shard, mem, mem if padded_batch is not None else None, rep, rep),
                   out_shardings=(shard, mem, mem))


@functools.lru_cache(maxsize=32)
def sweep_eval_program(b: Built, mesh: Mesh):
    """The jitted ``evaluate(state, dataset)`` of a group of members (:func:`~._chunk.evaluation` of each member's
    state) with the member axis sharded over ``mesh`` as :func:`sweep_programs` shards it, computed per device as
    it computes it: the evaluation a grouped chunk ends with, computed again from the group's state at that step (a
    member's ``metrics.jsonl`` row lost before the newest checkpoint).  The same traced computation on the same
    rows as the chunk's, equal to it bit for bit (``tests/test_runner_probe17.py``)."""
    mem, rep = NamedSharding(mesh, P("sweep")), NamedSharding(mesh, P())
    axes = _state_axes(b)
    shard = jax.tree.map(lambda a: rep if a is None else mem, axes, is_leaf=lambda a: a is None)

    def body(state, dataset, *, single):
        ev = evaluation(b, state[0], state[2], dataset)
        return jax.tree.map(lambda v: v[None], ev) if single else ev

    local = _per_device(body, (axes, None), 0)
    program = jax.shard_map(local, mesh=mesh, in_specs=(_specs(axes), P()), out_specs=P("sweep"), check_vma=False)
    return jax.jit(program, in_shardings=(shard, rep), out_shardings=mem)


def _group_state(b: Built, member_state, idx: list[int], mesh: Mesh):
    """The state of a vmapped group of members (rows ``idx``) as global arrays sharded over ``mesh``, assembled
    from ``member_state(i)`` (one member's state on the host).  Only the rows this process holds are asked for."""
    leaves, treedef = jax.tree.flatten(_state_shapes(b))
    mem, rep = NamedSharding(mesh, P("sweep")), NamedSharding(mesh, P())
    local = idx[_owned_rows(mem, len(idx))[0]]
    out = []
    for k, x in enumerate(leaves):
        if x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer):  # step counters: equal for all, unbatched
            out.append(_global(np.asarray(jax.tree.leaves(member_state(local))[k]), rep))
            continue

        def rows(index, k=k):
            sel = range(*index[0].indices(len(idx)))
            return np.stack([jax.tree.leaves(member_state(idx[r]))[k] for r in sel])

        out.append(jax.make_array_from_callback((len(idx),) + x.shape, mem, rows))
    return jax.tree.unflatten(treedef, out)


def _member_states(b: Built, layout: _Layout, states: list, mesh: Mesh) -> dict[int, Any]:
    """``{member: its state on the host}`` for the members (padding included) held by this process."""
    out = {}
    if not layout.batched:
        for idx, st in zip(layout.groups, states):
            out[idx[0]] = jax.device_get(st)
        return out
    flags = [not (x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer)) for x in jax.tree.leaves(_state_shapes(b))]
    for idx, st in zip(layout.groups, states):
        leaves, treedef = jax.tree.flatten(st)
        rows: dict[int, list] = {}
        for x, is_batched in zip(leaves, flags):
            shards = x.addressable_shards
            if not is_batched:
                value = np.asarray(shards[0].data)
                for r in _owned_rows(NamedSharding(mesh, P("sweep")), len(idx)):
                    rows.setdefault(r, []).append(value)
                continue
            for sh in shards:
                start, data = sh.index[0].start or 0, np.asarray(sh.data)
                for j in range(data.shape[0]):
                    rows.setdefault(start + j, []).append(data[j])
        for r, vals in rows.items():
            out[idx[r]] = jax.tree.unflatten(treedef, vals)
    return out


def _global(x: np.ndarray, sharding) -> jax.Array:
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _owned_rows(sharding, size: int) -> list[int]:
    """The rows of a ``(size, ...)`` array sharded with ``sharding`` that this process holds."""
    rows = set()
    for idx in sharding.addressable_devices_indices_map((size,)).values():
        sl = idx[0]
        rows.update(range(*sl.indices(size)))
    return sorted(rows)


def _host_rows_start(tree, batched: bool):
    """Start bringing ``tree`` to the host: dispatches the device work (:func:`~._chunk.to_host_start`); called
    right after the chunk that computes ``tree`` and before the next is dispatched, so that fetching the rows
    (:func:`_host_rows_finish`) does not wait for the next chunk."""
    leaves, treedef = jax.tree.flatten(tree)
    if not batched:
        return "unbatched", to_host_start(leaves), treedef
    if all(x.is_fully_addressable for x in leaves):
        return "addressable", to_host_start(tree), None
    return "shards", leaves, treedef


def _host_rows_finish(handle) -> dict:
    """``tree`` on the host: numpy leaves with the member axis first (all of it when the arrays are addressable
    from this process, else ``{row: leaf row}`` dicts of the rows held here).  Addressable trees (those of all
    groups at once) come over in one ``jax.device_get``."""
    kind, data, treedef = handle
    if kind == "unbatched":
        return jax.tree.unflatten(treedef, [np.asarray(x)[None] for x in to_host_finish(data)])
    if kind == "addressable":
        return to_host_finish(data)
    out = []
    for x in data:
        rows = {}
        for sh in x.addressable_shards:
            start = sh.index[0].start or 0
            sh_data = np.asarray(sh.data)
            for j in range(sh_data.shape[0]):
                rows[start + j] = sh_data[j]
        out.append(rows)
    return jax.tree.unflatten(treedef, out)


# ---- choosing the number of members per device ------------------------------------------------------------------
#: Tracing and compiling a chunk program vmapped over a group of members, relative to the unbatched program it
#: replaces (measured on XLA:CPU: 1.34 for the quickstart MLP with its observables and Hessian, 1.38 for a
#: 784-256-256-10 MLP; 1.5-1.9 before the Hessian's Lanczos became a loop; 1.5 errs on the side of not batching a
#: sweep too short to pay the compilation back).
BATCHED_COMPILE_FACTOR = 1.5
#: Batched arithmetic slows down with the group size (the members' working sets compete for the caches): measured
#: here, 16 members of a 784-256-256-10 MLP (arithmetic 83% of its step) cost 9% more per member than one at a
#: time and 4 members 5% less.  The arithmetic of a group of ``m`` is charged ``1 + BATCHED_ARITHMETIC_SLOWDOWN
#: * (m - 1) * f`` times its unbatched time, which reproduces both.
BATCHED_ARITHMETIC_SLOWDOWN = 0.024
#: Seconds the first compilation of each chunk program took in this process (the costs decisions are based on).
_COMPILE_S: dict[tuple, float] = {}


def _best_time(f, *args, repeats: int = 3) -> float:
    out = jax.block_until_ready(f(*args))
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    del out
    return best


def machine_flop_rate() -> float:
    """Floating-point operations per second of the default device, measured on a 256^3 float32 matrix product
    (the size of one layer of the models this runs; milliseconds, one tiny compilation)."""
    a = jnp.full((256, 256), 0.5, jnp.float32)
    return 2 * 256**3 / _best_time(jax.jit(lambda a: a @ a), a, repeats=5)


@functools.lru_cache(maxsize=16)
def plain_step_flops(b: Built, padded_batch: int | None = None) -> float:
    """Floating-point operations of one plain training step of one member (batch sampling, loss, gradient,
    optimiser update; no observables), from XLA's cost analysis of the lowered step: nothing is compiled."""
    import optax

    tx = make_inner_optimizer(b.settings)
    bs = padded_batch or (b.settings.data.batch_size or None)

    def step(state, seed, dataset):
        p, st, ms = state
        batch = batch_fn(dataset, bs)(jnp.int32(0), batch_key(seed))
        if b.stateful:  # fresh containers for the model state inside the gradient, as in optim.train
            obj = lambda p: b.loss_fn(p, jax.tree.map(lambda a: a, ms), batch)  # noqa: E731
            (_, (_, ms)), g = jax.value_and_grad(obj, has_aux=True)(p)
        else:
            g = jax.grad(b.loss_fn)(p, batch)
        u, st = tx.update(g, st, p)
        return optax.apply_updates(p, u), st, ms

    def init():
        p, ms = init_model(b, 0, 0.0)
        return p, tx.init(p), ms

    cost = jax.jit(step).lower(jax.eval_shape(init), jax.ShapeDtypeStruct((), jnp.int32), b.dataset).cost_analysis()
    return float((cost or {}).get("flops", 0.0))


_SAVED_EVENT = "/jax/compilation_cache/compile_time_saved_sec"


def _temporary_bytes(compiled) -> int | None:
    """The bytes of temporaries XLA allocates for one call of ``compiled`` (per device), ``None`` where the backend
    does not say."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001  (no memory analysis on this backend)
        return None


def compile_seconds(lowered) -> tuple[Any, float]:
    """``(lowered.compile(), seconds)``: the time the compilation took, or, when JAX's persistent compilation
    cache (the CLI's, see ``quotient_sgd.cli``) served the program, the time its compilation took when it was
    cached (JAX reports the time a hit saves).  The sweep's batching decision weighs this cost, so it does not
    depend on what the cache holds."""
    saved: list[float] = []

    def listener(event, duration, **_):
        if event == _SAVED_EVENT:
            saved.append(float(duration))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        t = time.perf_counter()
        out = lowered.compile()
        seconds = time.perf_counter() - t
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return out, seconds + sum(saved)


def choose_members_per_device(*, chunk_s: float, compile_s, remaining_chunks: int, steps_per_chunk: int,
                              groups: int, flops: float, flop_rate: float, max_per_device: int,
                              ) -> tuple[int, dict[str, Any]]:
    """Members per device for the rest of a sweep (all, a quarter, or one), from what its first chunk cost.

    Every sweep starts one member per device, through the program a single run compiles.  After the first chunk
    the costs are known: ``chunk_s`` (seconds of that chunk for all ``groups`` groups of members),
    ``compile_s`` (the predicted seconds of tracing and compiling the batched program for ``m`` members per device,
    a callable ``m -> s``: :data:`BATCHED_COMPILE_FACTOR` times what the first chunk's program took, nothing if
    this process compiled that program before; or one number for all ``m``), and the arithmetic of a member's
    step, ``flops /
    flop_rate`` (:func:`plain_step_flops`, :func:`machine_flop_rate`).  Batching ``m`` members amortises what a
    step spends beyond its arithmetic (dispatch of many small operations, loops) and nothing of the arithmetic,
    which even slows down in large groups (:data:`BATCHED_ARITHMETIC_SLOWDOWN`): with ``f`` the arithmetic's
    fraction of the measured step, the rest of the sweep is predicted to cost
    ``f (1 + 0.024 (m - 1) f) + (1 - f) / m`` times what it costs one member per device, plus the compilation of
    the batched program.  The cheapest prediction wins if it
    saves at least 20% of the rest of the sweep; otherwise members keep running one at a time (a step that fills
    the cores, or a sweep too short to pay for the compilation).  Returns ``(m, measurements)``."""
    t_step = chunk_s / max(1, groups * steps_per_chunk)
    f = min(1.0, flops / flop_rate / t_step) if t_step > 0 else 1.0
    rest = remaining_chunks * chunk_s
    predicted, compile_m = {1: rest}, {}
    for m in sorted({max_per_device, max_per_device // 4} - {0, 1}):
        per_member = f * (1.0 + BATCHED_ARITHMETIC_SLOWDOWN * (m - 1) * f) + (1.0 - f) / m
        compile_m[m] = compile_s(m) if callable(compile_s) else compile_s
        predicted[m] = compile_m[m] + rest * per_member
    best = min(predicted, key=predicted.get)
    if predicted[best] > 0.8 * rest:
        best = 1
    return best, {"step_s": t_step, "arithmetic_s": flops / flop_rate, "unamortised_fraction": f,
                  "batched_compile_s": {str(k): v for k, v in compile_m.items()}, "rest_one_per_device_s": rest,
                  "predicted_rest_s": {str(k): v for k, v in predicted.items()}}


class _Layout:
    """``mpd`` members per device: groups of ``mpd * nd`` members, member ``(h * mpd + k) * nd + d`` of group
    ``h`` at row ``d * mpd + k``, i.e. on device ``d`` whatever ``mpd`` is (changing ``mpd`` moves no member to
    another device, or process).  Indices ``>= n`` pad the last group (copies of real members, not written)."""

    def __init__(self, mpd: int, nd: int, n: int, padded: bool):
        self.mpd = mpd
        size = mpd * nd
        self.batched = not (size == 1 and not padded)  # one member on one device: the unbatched program
        self.groups = [[(h * mpd + r % mpd) * nd + r // mpd for r in range(size)] for h in range(math.ceil(n / size))]


# ---- the run directory of a sweep -------------------------------------------------------------------------------
def _pack(states: list):
    """The checkpointed form of the groups' states: one tree with the groups stacked on the host (few large
    leaves: orbax's cost grows with the number of leaves), or, across processes, the list of global arrays."""
    if jax.process_count() > 1:
        return states
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states)


def _unpack(packed, templates: list) -> list:
    if jax.process_count() > 1:
        return packed
    return [jax.tree.map(lambda p, t: jax.device_put(p[g], t.sharding), packed, tg) for g, tg in enumerate(templates)]


def _check_sweep_dir(workdir: str, s: Settings) -> dict | None:
    """The ``sweep.json`` of this sweep when ``workdir`` holds it (a sweep to resume), ``None`` for a new or
    empty directory; :class:`RunDirError` for a directory of anything else (nothing is written)."""
    check_directory_path(workdir, "sweep directory")
    check_not_inside_outputs(workdir, "sweep directory")
    path = os.path.join(workdir, "sweep.json")
    if os.path.isfile(path):
        meta = read_record_json(path, "sweep directory")
        diff = config_diff(meta["config"], s.to_dict(), unused_keys(s, "sweep"))
        if diff:
            lines = "; ".join(f"{k}: {a!r} (in the directory) != {b!r} (now)" for k, (a, b) in diff.items())
            raise RunDirError(f"sweep directory {workdir!r} holds a sweep of a different config ({lines}). "
                              f"Choose another --workdir, or delete the directory.")
        warn_absent_defaults(path, meta["config"], s.to_dict())
        return meta
    if os.path.isfile(os.path.join(workdir, "config.json")):
        raise RunDirError(f"sweep directory {workdir!r} holds a run (config.json), not a sweep; refusing to write "
                          f"into it. Run 'quotient-sgd run' on it, or choose another --workdir.")
    if foreign_entries(workdir, "sweep.json"):  # (a lone sweep.json.tmp: this sweep, killed while recording)
        raise RunDirError(f"sweep directory {workdir!r} exists, is not empty and has no sweep.json; refusing to "
                          f"write into it. Choose another --workdir.")
    return None


def _open_member_dir(d: str, ms: Settings, start: int, plots: bool = True, evaluate_at=None) -> dict | None:
    """Create (or reopen at checkpoint ``start``) a member's run directory; returns its divergence when it
    diverged before ``start``.  ``plots``: the sweep writes the members' plots; otherwise the plots of a member
    that computes nothing more (finished, or diverged before ``start``) are kept.  ``evaluate_at(ends)``: the
    member's evaluations at those chunk ends, for the rows lost before ``start`` (:func:`~._run.mend_metrics`)."""
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "config.json")
    div_path = os.path.join(d, "diverged.json")
    div = read_divergence(d, "sweep member directory")
    if div is not None and div["step"] >= start:
        os.remove(div_path)
        div = None
    parts, metrics = TrajectoryParts(d), MetricsLog(os.path.join(d, "metrics.jsonl"))
    parts.truncate(start)
    metrics.truncate(start)
    if div is None and start > 0:  # (rows lost before the checkpoint: rewritten from the parts, with a warning)
        mend_metrics(ms, metrics, parts, None, start, None, None, evaluate_at=evaluate_at)
    ended = div is not None or start >= ms.steps  # (computes nothing more: its plots and trajectory.npz stay)
    remove_outputs(d, plots=plots or not ended, trajectory=not ended)
    write_config(cfg, ms)
    return div


def _remove_sweep_outputs(workdir: str, *, plots: bool, summary: bool) -> None:
    """Remove the sweep's ``plots/`` (``plots``) and ``summary.md`` (``summary``) before a call that computes
    more steps or redraws them: the table and plots of a sweep reported part-way describe fewer steps than the
    resumed sweep has, and stale plots must not outlive the summary they were drawn with."""
    if plots:
        shutil.rmtree(os.path.join(workdir, "plots"), ignore_errors=True)
    if summary and os.path.exists(os.path.join(workdir, "summary.md")):
        os.remove(os.path.join(workdir, "summary.md"))


def _trajectory_bytes(b: Built, s: Settings, n: int) -> int:
    """Bytes of the trajectories of all ``n`` members (from the shapes of the recorded observables)."""
    from ..optim._trajectory import _find

    found = _find(_state_shapes(b)[1])
    leaves = jax.tree.leaves(found[0].observables) if found else []
    per_step = 64 + sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    return n * s.steps * per_step


def _finish_member(d: str, ms: Settings, diverged: dict | None, plots: bool, chunks: list | None = None,
                   computed: bool = True) -> None:
    from ._report import finalize

    traj = finished_trajectory(d, chunks)  # (the trajectory.npz of a member that computed nothing more is kept)
    finalize(d, dataclasses.replace(ms, logging=dataclasses.replace(ms.logging, plots=plots)), traj,
             diverged=diverged, wall_s=None, resumed_from=None, computed=computed)


# ---- the sweep ------------------------------------------------------------------------------------------------
def _notice(text: str) -> None:
    """Tell the user ``text`` on stderr (process 0 of a multi-host sweep only), as the command's own lines read
    (``quotient-sgd: ...``); the sweep's progress bar, when shown, is on stderr too."""
    if jax.process_index() == 0:
        print(f"quotient-sgd: {text}", file=sys.stderr, flush=True)


def _lowered_text(lowered: dict) -> str:
    """Why the members per device asked for (``lowered``, as ``sweep.json`` records it) were lowered."""
    n, nd = lowered["members"], lowered["devices"]
    return (f"{lowered['source']} = {lowered['requested']} asks for more members per device than a device gets: "
            f"{n} member(s) over {nd} device(s) put at most {lowered['used']} on a device, so "
            f"{lowered['used']} per device is used")


def _finished_end(workdir: str, n: int, last_checkpoint: int, steps: int) -> tuple[int, list]:
    """Where a finished sweep ended, and its members' ``diverged.json`` records (``None``: did not diverge): at
    ``last_checkpoint`` when every member had diverged before it (the sweep stops once no member is live), else at
    its last step (also without a checkpoint, ``last_checkpoint = 0``)."""
    divs = [read_divergence(os.path.join(workdir, "members", f"{i:03d}"), "sweep member directory") for i in range(n)]
    if last_checkpoint and all(d is not None and d["step"] < last_checkpoint for d in divs):
        return last_checkpoint, divs
    return steps, divs


def _finished_result(workdir: str, s: Settings, old: dict, members: list[dict], nd: int, t0: float) -> SweepResult:
    """The result of a finished sweep found by a call whose devices differ from those that computed it
    (``old``: its ``sweep.json``): nothing is left to compute, and nothing is written; the result is read from the
    records.  It ends where a call on the sweep's own devices ends: at the last step, or, when every member had
    diverged by then, at its last checkpoint."""
    n = len(members)
    dirs = [os.path.join(workdir, "members", f"{i:03d}") for i in range(n)]
    ckpts = checkpoint_steps(workdir) if s.checkpoint.enabled else []
    end, divs = _finished_end(workdir, n, ckpts[-1] if ckpts else 0, s.steps)
    _notice(f"sweep directory {workdir!r} holds a finished sweep, computed with {old['num_devices']} device(s) in "
            f"{old['num_processes']} process(es); nothing is left to compute with the {nd} device(s) in "
            f"{jax.process_count()} process(es) of this call, so its results are kept as they are (nothing was "
            f"written; `quotient-sgd report {workdir}` redraws its table and plots)")
    return SweepResult(workdir, n, members, dirs, {i: d for i, d in enumerate(divs) if d is not None},
                       old["members_per_device"], old["num_devices"], time.time() - t0, end, end,
                       old.get("measured_cost", {}), old["schedule"], wrote=False)


def _rewind_to_parts(workdir: str, ckpt: Checkpoints, n: int, every: int) -> None:
    """Delete the checkpoints newer than the members' trajectory parts reach, so that the sweep resumes from the
    newest kept checkpoint at or before the first chunk some member has no ``part_<a>.npz`` of (a member that
    diverged needs the chunks up to its divergence only), or from step 0.  A command with
    ``checkpoint.enabled=False`` starts a sweep again from step 0, dropping its members' parts and rows, and keeps
    the checkpoints an earlier command wrote; interrupted, then resumed with checkpoints on, the sweep restored
    that newer checkpoint, and its members' trajectories lacked the steps between (20 of 40 steps: rows "lost").
    Every process of a multi-host sweep reads the same files and reaches the same decision: they all read before
    any of them deletes (a barrier between; orbax's ``delete`` is itself a collective that every process must
    call for the same steps).  A ``RuntimeWarning`` names the step it resumes from."""
    import warnings

    kept = sorted(ckpt.manager.all_steps())
    missing = [first_missing_part(os.path.join(workdir, "members", f"{i:03d}"), kept[-1], every)
               for i in range(n if kept else 0)]
    first = min((a for a in missing if a is not None), default=None)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("quotient_sgd_sweep_rewind_to_parts")
    if first is None:
        return
    base = resume_point(kept, first)
    for k in kept:
        if k > base:
            ckpt.manager.delete(k)
    if jax.process_index() == 0:
        warnings.warn(f"sweep directory {workdir!r}: a member has no trajectory part of the chunk from step {first} "
                      f"on, before the checkpoint of step {kept[-1]} (a command with checkpoint.enabled=False started "
                      f"the sweep again from step 0 and was stopped, or the part was removed, or it does not load); "
                      f"resuming from "
                      + (f"the checkpoint of step {base}" if base else "step 0")
                      + f" instead, to compute steps {base} to {kept[-1] - 1} again", RuntimeWarning, stacklevel=4)


def _layout_at(schedule: list[dict], step: int) -> int:
    """Members per device of the chunk that ends at ``step`` (the layout of the checkpoint of ``step``)."""
    mpd = schedule[0]["members_per_device"]
    for entry in schedule[1:]:
        if entry["from_step"] < step:
            mpd = entry["members_per_device"]
    return mpd


#: Bytes of a refusal's message passed between the processes of a multi-host sweep (:func:`_agree`).
_MESSAGE_BYTES = 2048


def _agree(error: BaseException | None, who: str) -> None:
    """The processes of a multi-host sweep agree on going on: each passes the exception its checks of the
    directory raised (``None``: none), and every process raises when any did, the process that failed its own
    exception, the others a :class:`RunDirError` quoting it.  (A refusal in one process alone left the others
    waiting for it in a collective, then failing with a traceback once it had exited.)  Nothing in one
    process."""
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    from jax.experimental import multihost_utils

    msg = b"" if error is None else f"{who}: {error}".encode()[: _MESSAGE_BYTES - 1]
    buf = np.zeros(_MESSAGE_BYTES, np.uint8)
    buf[0] = error is not None
    buf[1:1 + len(msg)] = np.frombuffer(msg, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(buf))
    if error is not None:
        raise error
    failed = [bytes(row[1:]).rstrip(b"\0").decode(errors="replace") for row in every if row[0]]
    if failed:
        raise RunDirError("; ".join(failed))


def _same_call_everywhere(call: dict) -> None:
    """The processes of a multi-host sweep were started with the same call: ``call`` (the settings, the workdir
    and the arguments, JSON-ready) is compared across processes, and every process raises :class:`ConfigError`
    naming the keys in which some process differs from process 0.  (Processes given different overrides ran one
    sweep whose members on process 1's devices trained with process 1's settings, ``optim.momentum`` 0.5, while
    ``sweep.json`` and the table recorded process 0's 0.9; different ``--workdir`` values split one sweep over two
    directories.)  Processes with different numbers of devices are refused first, alike in every process.  Two
    collectives when they agree (a digest), one more when they do not; nothing in one process."""
    if jax.process_count() == 1:
        return
    # (JAX's collectives between processes lay jax.devices() out as processes x local devices: with 1 and 3 CPU
    # devices the first one failed in "cannot reshape array of size 4 into shape (2,1)", a traceback in both.
    # Every process sees the same device list, so each refuses it alike without a collective)
    counts = [0] * jax.process_count()
    for d in jax.devices():
        counts[d.process_index] += 1
    if len(set(counts)) > 1:
        raise ConfigError(f"the processes of this multi-host sweep have different numbers of devices ("
                          f"{', '.join(f'process {i}: {c}' for i, c in enumerate(counts))}); every process needs "
                          f"the same number (the same accelerators on every host; JAX_NUM_CPU_DEVICES for CPU "
                          f"devices); nothing was written")
    import hashlib
    import json

    from jax.experimental import multihost_utils

    text = json.dumps(call, sort_keys=True, default=repr).encode()
    head = np.zeros(40, np.uint8)
    head[:8] = np.frombuffer(np.int64(len(text)).tobytes(), np.uint8)
    head[8:] = np.frombuffer(hashlib.sha256(text).digest(), np.uint8)
    heads = np.asarray(multihost_utils.process_allgather(head))
    if (heads == heads[0]).all():
        return
    size = int(max(np.frombuffer(h[:8].tobytes(), np.int64)[0] for h in heads))
    buf = np.zeros(size, np.uint8)
    buf[:len(text)] = np.frombuffer(text, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(buf))
    calls = [_flat(json.loads(bytes(row).rstrip(b"\0").decode())) for row in every]
    diffs = []
    for i, c in enumerate(calls[1:], 1):
        keys = [k for k in sorted(set(calls[0]) | set(c)) if calls[0].get(k, "<absent>") != c.get(k, "<absent>")]
        diffs += [f"process {i}: {k} = {c.get(k, '<absent>')!r} (process 0: {calls[0].get(k, '<absent>')!r})"
                  for k in keys]
    raise ConfigError(f"the processes of this multi-host sweep were started with different settings ("
                      f"{'; '.join(diffs[:8])}{'; ...' if len(diffs) > 8 else ''}); nothing was written. Start the "
                      f"same command, config, overrides and --workdir, on every process")


def sweep(settings: Settings, workdir: str, *, members_per_device: int | None = None, devices=None,
          plots: bool | None = None, max_chunks: int | None = None) -> SweepResult:
    """Run the sweep of ``settings`` into ``workdir``: ``sweep.json``, ``members/<i>/`` (one run directory per
    member), ``checkpoints/`` (every member's state after every chunk), ``summary.md`` (the table) and
    ``plots/*.png`` (comparisons).  A directory holding this sweep resumes from its last checkpoint, with the
    recorded members per device, so the trajectories equal those of an uninterrupted sweep.

    Members run one per device through the program of a single run for the first chunk; then
    :func:`choose_members_per_device` decides from what that chunk cost whether the rest runs batched.

    A finished sweep run again computes nothing.  Run on other devices (another count, or another number of
    processes) than those that computed it, it writes nothing and says so on stderr; an unfinished sweep is
    refused there (:class:`RunDirError`), since its checkpoints hold the members in the layout of its devices.

    Args:
        members_per_device: fix the number of members vmapped per device (``sweep.members_per_device``
            otherwise; 0 = decide from the measured cost).  More than the members a device gets
            (``ceil(members / devices)``) is lowered to that, said on stderr and recorded in ``sweep.json``
            (``members_per_device_lowered``) and ``summary.md``.
        devices: devices of the mesh (default: ``jax.devices()``, every device of every process).
        plots: draw the comparison plots and the members' plots (``True`` / ``False``; ``None``: ``logging.plots``).
        max_chunks: stop after that many chunks (tests; an integer >= 0).

    A bad ``members_per_device``, ``devices``, ``plots`` or ``max_chunks`` raises ``ValueError`` naming it, before
    anything is written.

    A new sweep that fails with an exception before its first chunk is written leaves nothing behind (in one
    process: what this call created is removed, the directory itself when this call created it), so the
    corrected command can run into the same ``workdir``.  A directory being resumed is never removed.
    """
    require_settings(settings, "sweep", "settings")  # (every process: raised before anything is written)
    workdir = directory_path(workdir, "sweep")
    if members_per_device is not None and (isinstance(members_per_device, (bool, np.bool_))
                                           or not isinstance(members_per_device, (int, np.integer))
                                           or members_per_device < 0):
        # (-2 fixed one member per device and skipped the cost measurement, 2.5 was used as 2, "2" failed in '<')
        raise ValueError(f"sweep: members_per_device={members_per_device!r} is not allowed; need an integer >= 1 "
                         f"(members vmapped per device), 0 or None (sweep.members_per_device, 0 there: chosen from "
                         f"the measured cost)")
    require_max_chunks(max_chunks, "sweep")
    if plots is not None and not isinstance(plots, (bool, np.bool_)):  # ("no" drew the plots)
        raise ValueError(f"sweep: plots={plots!r} is not allowed; need True, False or None (logging.plots)")
    if devices is not None:
        given = list(devices) if not isinstance(devices, (str, bytes)) and hasattr(devices, "__iter__") else None
        if (not given or not all(isinstance(d, jax.Device) for d in given)
                or len({(d.platform, d.id) for d in given}) != len(given)):
            # ([] failed in a ZeroDivisionError, a device listed twice in XLA's "Number of processed shards does
            # not match the number of addressable devices", "cpu" in an AttributeError)
            raise ValueError(f"sweep: devices={devices!r} is not allowed; need a non-empty list of distinct "
                             f"jax.Device objects (e.g. jax.devices()[:4]), or None for every device")
        devices = given  # (an iterator is read once)
    require_tensorboard(settings)
    _same_call_everywhere({"config": settings.to_dict(), "workdir": workdir, "members_per_device": members_per_device,
                           "plots": plots, "max_chunks": max_chunks,
                           "devices": None if devices is None else [[d.platform, d.id] for d in devices]})
    created = not os.path.isdir(workdir)
    progress = {"new": False, "chunks": 0}
    lock = None
    error = None
    if jax.process_index() == 0:  # (the processes of a multi-host sweep share the directory: one holds the lock)
        try:
            # (raises before anything is written; a new sweep failing before its first chunk is removed)
            progress["new"] = _check_sweep_dir(workdir, settings) is None
            make_directory(workdir, "sweep directory")
            lock = lock_directory(workdir, "sweep directory")  # (refused: the directory is another call's)
        except Exception as e:  # noqa: BLE001  (raised below, in every process)
            error = e
    try:
        _agree(error, "process 0")
    except BaseException:
        unlock_directory(lock)
        raise
    try:
        return _sweep(settings, workdir, progress, members_per_device=members_per_device, devices=devices,
                      plots=plots, max_chunks=max_chunks)
    except BaseException:
        if progress["new"] and not progress["chunks"] and jax.process_count() == 1:
            if progress.get("checkpoints") is not None:
                try:  # an exception before the chunk loop leaves the manager open
                    progress["checkpoints"].close()
                except Exception:  # noqa: BLE001  (the original exception is what matters)
                    pass
            discard_new_run(workdir, created)
        raise
    finally:
        unlock_directory(lock)


def _sweep(settings: Settings, workdir: str, progress: dict, *, members_per_device: int | None, devices,
           plots: bool | None, max_chunks: int | None) -> SweepResult:
    t0 = time.time()
    s = settings
    n = num_members(s)  # (the members themselves once the memory check has passed: a product may be huge)
    try:
        old = _check_sweep_dir(workdir, s)  # raises before anything is written
    except Exception as e:  # noqa: BLE001  (every process raises, see _agree)
        _agree(e, f"process {jax.process_index()}")
        raise
    progress["new"] = old is None
    devices = list(jax.devices() if devices is None else devices)
    nd = len(devices)
    if (old is not None and old.get("wall_s") is not None
            and (old["num_devices"], old["num_processes"]) != (nd, jax.process_count())):
        # finished (the call that finished it recorded its wall time): nothing is left to compute, so the layout
        # its checkpoints hold is never read; every process reads the same sweep.json and returns here
        return _finished_result(workdir, s, old, sweep_members(s), nd, t0)
    b = build(s)
    mesh = Mesh(np.array(devices), ("sweep",))
    mem, rep = NamedSharding(mesh, P("sweep")), NamedSharding(mesh, P())
    one = devices[0]  # (the device of the unbatched program: a mesh of one device)
    per_dev_max = math.ceil(n / nd)
    leader = jax.process_index() == 0
    multi = jax.process_count() > 1
    every = s.checkpoint.every
    padded = max(s.sweep.batch_size) if s.sweep.batch_size else None
    if multi:
        from jax.experimental import multihost_utils
    # the recorded grouping holds wherever checkpoints exist (also when this call writes none: they stay
    # consistent with sweep.json, and the steps recomputed from 0 are those of the recorded sweep)
    if old is not None and checkpoint_steps(workdir):
        if (old["num_devices"], old["num_processes"]) != (nd, jax.process_count()):  # (unfinished: see above)
            e = RunDirError(
                f"sweep directory {workdir!r} was checkpointed with {old['num_devices']} device(s) in "
                f"{old['num_processes']} process(es), now {nd} in {jax.process_count()}: its checkpoints hold the "
                f"members in that layout. Resume with the same devices, or choose another --workdir.")
            _agree(e, f"process {jax.process_index()}")
            raise e
        schedule, decided, costs = old["schedule"], old["decided"], old.get("measured_cost", {})
        lowered = old.get("members_per_device_lowered")
        recorded = max(e["members_per_device"] for e in schedule)  # (the layouts its checkpoints hold)
        requested, source = (recorded if decided else per_dev_max), ""
    else:
        fixed = members_per_device or s.sweep.members_per_device
        source = "the members_per_device argument" if members_per_device else "sweep.members_per_device"
        schedule = [{"from_step": 0, "members_per_device": max(1, min(fixed or 1, per_dev_max))}]
        decided, costs = bool(fixed) or per_dev_max == 1, {}
        lowered = None
        if fixed and fixed > per_dev_max:  # (more would only pad every group with copies of members)
            lowered = {"requested": fixed, "used": per_dev_max, "members": n, "devices": nd, "source": source}
        recorded = None
        requested, source = (schedule[0]["members_per_device"], source) if fixed else (per_dev_max, "")
    # what the members hold against this machine's memory, before anything is computed or written: a grouping
    # fixed beyond it is refused, an automatic one is chosen among those that fit
    regauge = any(g > 0 for g in (s.sweep.init_gauge or (s.init_gauge,)))  # (some member re-gauges)
    try:
        error, memory_cap = None, sweep_members_cap(b, s, n, devices, requested, source=source, regauge=regauge)
        check_init_gauge(b, _gauges(s))  # (each member's re-gauged function is its own)
        if recorded is not None and memory_cap < recorded:
            raise ConfigError(f"sweep directory {workdir!r} was checkpointed with {recorded} members per device "
                              f"(its checkpoints hold them so), and at most {memory_cap} fit this machine's memory; "
                              f"resume it on a machine with more memory, or choose another --workdir")
    except ConfigError as e:
        error = e
    if multi:  # every process has checked the directory (and its memory) before anyone writes into it
        _agree(error, f"process {jax.process_index()}")
    elif error is not None:
        raise error
    if recorded is None and lowered is not None:
        _notice(f"{_lowered_text(lowered)} (recorded in {os.path.join(workdir, 'sweep.json')})")
    members = sweep_members(s)

    # the wall time of the call that finished the sweep (kept by a re-run that computes nothing, and by report),
    # and the step that call resumed from (its wall time does not include the calls before)
    recorded_wall = None if old is None else old.get("wall_s")
    recorded_resume = None if old is None else old.get("resumed_from")

    def record():
        if leader:
            make_directory(workdir, "sweep directory")
            meta = {"config": s.to_dict(), "members": members, "num_devices": nd, "num_processes": jax.process_count(),
                    "members_per_device": schedule[-1]["members_per_device"], "schedule": schedule,
                    "decided": decided, "measured_cost": costs}
            if lowered is not None:
                meta["members_per_device_lowered"] = lowered
            if recorded_wall is not None:
                meta["wall_s"] = recorded_wall
                if recorded_resume:
                    meta["resumed_from"] = recorded_resume
            write_json(os.path.join(workdir, "sweep.json"), meta)

    record()
    if plots if plots is not None else s.logging.plots:
        from ._report import prefetch_plotting

        prefetch_plotting()
    init1 = init_program(b, regauge)
    host_states: dict[int, Any] = {}

    def member_state(i):
        """Member ``i``'s initial state on the host, from the unbatched init program of a single run."""
        if i not in host_states:
            m = members[min(i, n - 1)]
            host_states[i] = jax.device_get(init1(
                jnp.int32(m.get("seed", s.seed)), jnp.float32(m.get("init_gauge", s.init_gauge)),
                jnp.float32(m.get("lr", s.optim.lr)), jnp.float32(m.get("weight_decay", s.optim.weight_decay)),
                jnp.float32(m.get("momentum", s.optim.momentum))))
        return host_states[i]

    def make_states(layout: _Layout, state_of) -> list:
        if layout.batched:
            return [_group_state(b, state_of, idx, mesh) for idx in layout.groups]
        return [jax.device_put(state_of(idx[0]), one) for idx in layout.groups]

    def value_of(i, axis, default):
        return members[min(i, n - 1)].get(axis, default)

    def inputs(layout: _Layout) -> list:
        """Per group: ``(seeds, batch sizes or None)``, the members' program inputs besides the state."""
        out = []
        for idx in layout.groups:
            def arr(axis, default, dt):
                x = np.array([value_of(i, axis, default) for i in idx], dt)
                return _global(x, mem) if layout.batched else jax.device_put(x[0], one)

            out.append((arr("seed", s.seed, np.int32),
                        arr("batch_size", s.data.batch_size, np.int32) if padded is not None else None))
        return out

    def owned(layout: _Layout) -> list[list[int]]:
        rows = _owned_rows(mem, len(layout.groups[0])) if layout.batched else [0]
        return [[j for j in rows if idx[j] < n] for idx in layout.groups]

    # the flops of a plain step are counted while the first program compiles (decisions only)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    flops_future = pool.submit(plain_step_flops, b, padded) if not decided else None
    pool.shutdown(wait=False)

    dataset_global = jax.tree.map(lambda x: _global(np.asarray(x), rep), b.dataset)
    # the unbatched program (one member on the mesh's one device) runs on that device: its inputs are placed there
    # (they went to the default device, so sweep(devices=[jax.devices()[1]]) computed on device 0)
    dataset_one = jax.device_put(b.dataset, one) if nd == 1 else b.dataset
    compiled: dict[tuple[int, int], Any] = {}

    def program(layout: _Layout, num_steps: int, state, ins):
        key = (layout.mpd, num_steps)
        if key not in compiled:
            if layout.batched:
                f = sweep_programs(b, num_steps, padded, mesh)
                lowered = f.lower(state, ins[0], ins[1], dataset_global, _global(np.int32(0), rep))
            else:
                f = single_programs(b, num_steps)
                lowered = f.lower(state, ins[0], None, dataset_one, jax.device_put(np.int32(0), one))
            compiled[key], seconds = compile_seconds(lowered)
            # the first compilation in this process is the real cost (later ones come from JAX's caches)
            _COMPILE_S.setdefault((b, mesh, padded, num_steps, layout.mpd), seconds)
        return compiled[key]

    def batched_compile_s(num_steps: int, mpd: int) -> float:
        """Predicted cost of compiling the batched program: nothing if this process compiled it already."""
        if (b, mesh, padded, num_steps, mpd) in _COMPILE_S:
            return 0.0
        return BATCHED_COMPILE_FACTOR * _COMPILE_S[(b, mesh, padded, num_steps, layout.mpd)]

    layout = _Layout(schedule[0]["members_per_device"], nd, n, padded is not None)
    ckpt = Checkpoints(workdir, s.checkpoint.keep) if s.checkpoint.enabled else None
    progress["checkpoints"] = ckpt
    # a finished sweep computes nothing, unless a member's trajectory is in no file (its trajectory.npz does not load
    # and its parts are gone): its finished trajectory was assembled from no part, an empty one written over it
    lost = (old is not None and old.get("wall_s") is not None
            and any(lost_trajectory(os.path.join(workdir, "members", f"{i:03d}"), s, None) is not None
                    for i in range(n)))
    if ckpt is not None and (old is None or old.get("wall_s") is None or lost):
        _rewind_to_parts(workdir, ckpt, n, every)
    start = 0
    if ckpt is not None:
        start, packed = ckpt.restore_latest(
            lambda step: _pack(make_states(_Layout(_layout_at(schedule, step), nd, n, padded is not None),
                                           member_state)))
        if start:
            layout = _Layout(_layout_at(schedule, start), nd, n, padded is not None)
            states = _unpack(packed, make_states(layout, member_state))
    if old is not None and old.get("wall_s") is not None and start < s.steps and not lost:
        # a finished sweep (its wall time is recorded) computes nothing: it ended at its last checkpoint only when
        # every member had diverged by then; without checkpoints (checkpoints off), or with an older one (finished
        # with checkpoints off after an interruption), it ended at its last step
        if _finished_end(workdir, n, start, s.steps)[0] != start:
            start, states = s.steps, []
            layout = _Layout(_layout_at(schedule, start), nd, n, padded is not None)
    if not start:
        states = make_states(layout, member_state)
    ins, own = inputs(layout), owned(layout)
    dirs = [os.path.join(workdir, "members", f"{i:03d}") for i in range(n)]
    evaluations: dict[int, tuple[dict[int, dict], str]] = {}  # chunk end -> ({member: evaluation}, how)

    def evaluations_at(c: int) -> tuple[dict[int, dict], str]:
        """Every member's evaluation at chunk end ``c`` (before ``start``, or ``start`` itself), as the grouped
        chunk ending at ``c`` computed it: the groups' states at ``c`` (the restored checkpoint of ``start``, the
        checkpoint of ``c`` when it is kept, else replayed with the sweep's own chunk programs and layouts from
        the newest kept checkpoint before ``c`` or from the initial states), evaluated in the layout of that chunk
        by the same traced computation (:func:`sweep_eval_program`, or :func:`~._chunk.eval_program` for one
        unbatched member)."""
        if c in evaluations:
            return evaluations[c]
        lay_c = _Layout(_layout_at(schedule, c), nd, n, padded is not None)
        kept = set(ckpt.manager.all_steps()) if ckpt is not None else set()
        if c == start and states:
            st, how = states, f"the checkpoint of step {c}"
        elif c in kept:
            tmpl = make_states(lay_c, member_state)
            st, how = _unpack(ckpt.restore(c, _pack(tmpl)), tmpl), f"the checkpoint of step {c}"
        else:
            k = max((x for x in kept if x < c), default=0)
            lay = _Layout(_layout_at(schedule, k) if k else schedule[0]["members_per_device"], nd, n,
                          padded is not None)
            tmpl = make_states(lay, member_state)
            st = _unpack(ckpt.restore(k, _pack(tmpl)), tmpl) if k else tmpl
            for a, cc in chunk_bounds(k, c, every):
                mpd = _layout_at(schedule, cc)
                if mpd != lay.mpd:  # (regrouped as the sweep regrouped)
                    new = _Layout(mpd, nd, n, padded is not None)
                    held = _member_states(b, lay, st, mesh)
                    st, lay = make_states(new, lambda i: held[i] if i in held else held[i % nd]), new
                lay_ins = inputs(lay)
                f = program(lay, cc - a, st[0], lay_ins[0])
                first = _global(np.asarray(a, np.int32), rep) if lay.batched else jax.device_put(np.int32(a), one)
                data = dataset_global if lay.batched else dataset_one
                st = [f(st[g], lay_ins[g][0], lay_ins[g][1], data, first)[0] for g in range(len(lay.groups))]
            how = f"steps {k} to {c} replayed from " + (f"the checkpoint of step {k}" if k else "the initial state")
        out: dict[int, dict] = {}
        for g, idx in enumerate(lay_c.groups):
            if lay_c.batched:
                ev = _host_rows_finish(_host_rows_start(sweep_eval_program(b, mesh)(st[g], dataset_global), True))
            else:
                ev = {k: np.asarray(v)[None] for k, v in to_host(eval_program(b)(st[g], dataset_one)).items()}
            for j, i in enumerate(idx):
                if i < n:
                    out[i] = {k: v[j] for k, v in ev.items() if k != "params_finite"}
        evaluations[c] = (out, how)
        return evaluations[c]

    def evaluate_member(i: int, ends: list[int]) -> dict:
        return {c: (out[i], how) for c in ends for out, how in (evaluations_at(c),)}

    diverged: dict[int, dict] = {}
    for g, idx in enumerate(layout.groups):
        for j in own[g]:
            # (across processes a group's programs span processes, and each process mends its own members only:
            # there the evaluation of a lost row stays lost, with the warning)
            dv = _open_member_dir(dirs[idx[j]], member_settings(s, idx[j], members[idx[j]]), start,
                                  plots if plots is not None else s.logging.plots,
                                  evaluate_at=None if multi else functools.partial(evaluate_member, idx[j]))
            if dv is not None:
                diverged[idx[j]] = dv
    ended_before = set(diverged) if start < s.steps else set(range(n))  # (members this call computes nothing of)
    host_states.clear()
    evaluations.clear()

    from tqdm import tqdm

    bar = tqdm(total=s.steps * n, initial=start * n, unit="member-step", desc=f"{s.name} sweep ({n} members, "
               f"{nd} device{'s' if nd != 1 else ''})", disable=not (s.logging.progress and leader), dynamic_ncols=True)
    writers: dict[int, Any] = {}  # TensorBoard writers of the members held here (logging.tensorboard)

    def tensorboard(i: int):
        if i not in writers:
            writers[i] = _tensorboard(s, dirs[i], start)
        return writers[i]

    def host_outputs(p: list) -> list:
        """The outputs of the pending chunk ``p`` on the host (waits for the chunk; fetched once)."""
        if p[3] is None:
            p[2], p[3] = None, _host_rows_finish(p[2])
        return p[3]

    def ending(p: list) -> set[int]:
        """The members held here whose divergence the pending chunk ``p`` records (read from its outputs on the
        host, as :func:`write_chunk` does)."""
        a, lay, own_c, out = p[0], p[5], p[6], set()
        for g, o in enumerate(host_outputs(p)):
            if o is None:
                continue
            traj, ev = o
            for j in own_c[g]:
                i = lay.groups[g][j]
                if i not in diverged and first_divergence(traj["loss"][j], bool(ev["params_finite"][j]), a):
                    out.add(i)
        return out

    def write_chunk(p: list, before_checkpoint=None):
        """Rows and parts of the pending chunk ``p = [a, c, fetch, host, states, layout, owned]`` (``fetch``: the
        :func:`_host_rows_start` handle of its outputs, ``host``: those outputs once fetched) for the members held
        here, then the checkpoint of step ``c``."""
        a, c, _, _, states_c, lay, own_c = p
        host = host_outputs(p)
        for g, out in enumerate(host):
            if out is None:
                continue
            traj, ev = out
            for j in own_c[g]:
                i = lay.groups[g][j]
                if i in diverged:
                    continue
                t = {k: v[j] for k, v in traj.items()}
                t["step"] = np.arange(a, c, dtype=np.int64)
                e = {k: v[j] for k, v in ev.items()}
                dv = first_divergence(t["loss"], bool(e["params_finite"]), a)
                if dv is not None:
                    t = {k: v[: dv["step"] - a + 1] for k, v in t.items()}
                rows = scalar_rows(t, a, s.logging.every, (c - 1) if dv is None else dv["step"])
                if rows and dv is None:
                    rows[-1].update({k: v for k, v in e.items() if k != "params_finite"})
                TrajectoryParts(dirs[i]).write(a, t)
                if kept is not None:
                    kept.setdefault(i, []).append(t)
                MetricsLog(os.path.join(dirs[i], "metrics.jsonl")).append(rows)
                tb = tensorboard(i)
                if tb is not None:
                    write_tensorboard(tb, rows)
                if dv is not None:
                    diverged[i] = dv
                    write_json(os.path.join(dirs[i], "diverged.json"), dv)
        if before_checkpoint is not None:
            before_checkpoint()
        if ckpt is not None:
            ckpt.save(c, _pack(states_c))
        progress["chunks"] += 1
        bar.update((c - a) * n)

    # the chunks written by this call, per member, so that assembling trajectory.npz need not read them back
    # (not after a resume, whose earlier parts are on disk only, nor when they would hold more than 256 MB)
    kept: dict[int, list] | None = {} if start == 0 and _trajectory_bytes(b, s, n) <= 2**28 else None
    all_chunks = chunk_bounds(start, s.steps, every)
    chunks = all_chunks if max_chunks is None else all_chunks[:max_chunks]
    if not multi and len(diverged) == n:  # every member diverged before the checkpoint: the sweep has ended
        chunks = []
    if leader:
        # the sweep's summary.md and plots/ (of a `report` on the unfinished sweep) go when they would describe
        # fewer steps than this call ends with, or are rewritten; a finished sweep run again without plots keeps
        # those it has (the rule of a run's own outputs, remove_outputs)
        _remove_sweep_outputs(workdir, plots=bool(chunks) or (plots if plots is not None else s.logging.plots),
                              summary=bool(chunks))
    pending = None
    done = start
    try:
        for k, (a, c) in enumerate(chunks):
            # the divergences the previous chunk records decide what this one computes (waiting for that chunk,
            # whose rows are written while this one computes): the groups whose members have all diverged are not
            # run, and the sweep ends as soon as no member is live (across processes every group runs: the
            # programs of a group span processes, and each process sees its own members only)
            dead = set(diverged)
            if pending is not None and not multi:
                dead |= ending(pending)
                if len(dead) == n:
                    break
            due = [e["members_per_device"] for e in schedule[1:] if e["from_step"] == a]
            if due and due[-1] != layout.mpd:  # regroup the members (on the host of the process holding them)
                new = _Layout(due[-1], nd, n, padded is not None)
                held = _member_states(b, layout, states, mesh)
                states = make_states(new, lambda i: held[i] if i in held else held[i % nd])
                layout, ins, own = new, inputs(new), owned(new)
            # dispatch every group's chunk (asynchronous), then write the previous chunk while it computes
            start_arr = (_global(np.asarray(a, np.int32), rep) if layout.batched
                         else jax.device_put(np.int32(a), one))
            data = dataset_global if layout.batched else dataset_one
            run_chunk = program(layout, c - a, states[0], ins[0])
            t_chunk = time.perf_counter()
            outs = []
            for g, idx in enumerate(layout.groups):
                if not multi and all(i in dead for i in idx if i < n):
                    outs.append(None)
                    continue
                seeds, bsz = ins[g]
                states[g], traj, ev = run_chunk(states[g], seeds, bsz, data, start_arr)
                outs.append((flatten_trajectory(traj), ev))
            # the outputs' device-side gathering goes into the queue now, ahead of the next chunk
            fetch = _host_rows_start(outs, layout.batched)
            if pending is not None:
                write_chunk(pending)
                done = pending[1]
            pending = [a, c, fetch, None, list(states), layout, own]
            if not decided and k == 0 and a == 0:
                jax.block_until_ready(outs)
                chunk_s = time.perf_counter() - t_chunk

                def decide(chunk_s=chunk_s, a=a, c=c, layout=layout):
                    nonlocal decided, costs
                    cap = memory_cap
                    if cap > 1:  # what a member's step holds, as compiled: the members that may run at once
                        try:
                            cap = sweep_members_cap(b, s, n, devices, cap, regauge=regauge,
                                                    work=_temporary_bytes(compiled[(layout.mpd, c - a)]))
                        except ConfigError:  # (one member per device ran: it stays so)
                            cap = 1
                    m, costs = choose_members_per_device(
                        chunk_s=chunk_s, compile_s=lambda mpd: batched_compile_s(c - a, mpd),
                        remaining_chunks=len(all_chunks) - 1, steps_per_chunk=c - a, groups=len(layout.groups),
                        flops=flops_future.result(), flop_rate=machine_flop_rate(), max_per_device=cap)
                    if cap < per_dev_max:
                        costs["memory_members_per_device"] = cap
                    if multi:  # timings differ between processes: the leader's choice holds for all
                        m = int(multihost_utils.broadcast_one_to_all(np.int32(m)))
                    if m != layout.mpd:
                        schedule.append({"from_step": c, "members_per_device": m})
                    decided = True
                    record()  # before the checkpoint of step c: a resumed sweep regroups where this one does

                write_chunk(pending, before_checkpoint=decide)
                done, pending = c, None
            if not multi and len(diverged) == n:
                break
        if pending is not None:
            write_chunk(pending)
            done = pending[1]
    finally:
        # (an interrupt while the bar or the writers close is held back: the checkpoint being written is finalised)
        with sigint_deferred():
            try:
                bar.close()
                for tb in writers.values():
                    if tb is not None:
                        tb.close()
            finally:
                if ckpt is not None:
                    ckpt.close()
    finished = done >= s.steps or len(diverged) == n
    plots = plots if plots is not None else s.logging.plots
    if finished:
        for g, idx in enumerate(layout.groups):
            for j in own[g]:
                i = idx[j]
                _finish_member(dirs[i], member_settings(s, i, members[i]), diverged.get(i), plots,
                               None if kept is None else kept.get(i, []),
                               computed=bool(progress["chunks"]) and i not in ended_before)
    if multi:
        multihost_utils.sync_global_devices("quotient_sgd_sweep_done")
    wall = time.time() - t0
    res = SweepResult(workdir, n, members, dirs, diverged, layout.mpd, nd, wall, start, done, costs, schedule)
    if leader and finished:
        if progress["chunks"] or recorded_wall is None:
            recorded_wall, recorded_resume = wall, start
            record()
        with outputs_lock(workdir):
            if not plots and progress["chunks"]:  # (a `report` drawn while this call computed: fewer steps)
                shutil.rmtree(os.path.join(workdir, "plots"), ignore_errors=True)
            _report_sweep(workdir, wall_s=recorded_wall, plots=plots)
    return res


def _fmt_s(t: float) -> str:
    return f"{t * 1e6:.0f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.1f} s"


def _grouping_text(meta: dict) -> str:
    sched = meta.get("schedule") or [{"from_step": 0, "members_per_device": meta["members_per_device"]}]
    text = ", then ".join(f"{e['members_per_device']} member(s) per device from step {e['from_step']}"
                          for e in sched)
    cost = meta.get("measured_cost")
    if cost and cost.get("memory_members_per_device"):
        text += f" (memory allows at most {cost['memory_members_per_device']} member(s) per device)"
    if cost and "predicted_rest_s" in cost:
        pred = ", ".join(f"{k}: {_fmt_s(v)}" for k, v in cost["predicted_rest_s"].items())
        text += (f" (first chunk: a member's step {_fmt_s(cost['step_s'])}, {cost['unamortised_fraction']:.0%} of it "
                 f"arithmetic; predicted rest of the sweep, compilation included, by members per device: {pred})")
    return text


def _loss_axis_top(curves: list[tuple[dict, dict | None]]) -> float | None:
    """The top of the sweep's loss plot (log scale) when a member diverged: ten times the largest loss of the
    members that did not diverge and of the diverged members' first steps, so that a divergence (losses up to
    ~1e38 before the first non-finite one) leaves the scale of the other members' curves; ``None`` (the
    automatic range) when no member diverged or no finite loss is recorded.  A diverging member's curve then
    leaves the plot at its top; its label says where it diverged.  (A member diverging at lr=0.9 drew the tiny
    sweep's other members into 3 of the 24 decades of the axis.)"""
    if not any(div for _, div in curves):
        return None
    highs = []
    for traj, div in curves:
        loss = np.asarray(traj.get("loss", ()), np.float64)
        loss = loss[:1] if div else loss
        loss = loss[np.isfinite(loss) & (loss > 0)]
        if loss.size:
            highs.append(float(loss.max()))
    return 10.0 * max(highs) if highs else None


def report_sweep(workdir: str, *, wall_s: float | None = None, plots: bool = True) -> str:
    """The sweep table (``summary.md``) and comparison plots (``plots/loss.png``, ``plots/final.png``), drawn and
    written under :func:`~._rundir.outputs_lock` (a ``report`` of the sweep while it computes, and the sweep's
    own table once it has finished, are written one after the other, the later one from what the earlier wrote)."""
    with outputs_lock(workdir):
        return _report_sweep(workdir, wall_s=wall_s, plots=plots)


def _report_sweep(workdir: str, *, wall_s: float | None, plots: bool) -> str:
    from ._report import _plt, load_run, marked, run_divergence

    meta = read_record_json(os.path.join(workdir, "sweep.json"), "sweep directory", SWEEP_REPORT_KEYS)
    if wall_s is None:
        wall_s = meta.get("wall_s")
    members = meta["members"]
    cfg = from_dict(meta["config"])  # (the keys an older version did not write read as their defaults)
    total = cfg.steps
    rows = []
    curves = []
    for i, m in enumerate(members):
        d = os.path.join(workdir, "members", f"{i:03d}")
        if not os.path.exists(os.path.join(d, "config.json")):
            rows.append((i, m, None, None, "missing", None))
            continue
        try:
            _, traj, metrics, events = load_run(d)
        except ConfigError as e:  # (the command said "its sweep.json's config is not a valid config")
            raise RunDirError(f"cannot report {workdir!r}: the config.json of its member {d!r} is not a valid "
                              f"config: {e}") from None
        check_trajectory_loaded(workdir, d, traj, member=True)
        ev = [r for r in metrics if "test_loss" in r]
        div = run_divergence(d, traj, events)
        done = len(traj.get("step", ()))
        # a sweep reported while it runs, or after an interruption: its members have not all their steps yet
        if div:  # (inferred: a kill between the member's diverging part and its diverged.json)
            status = f"diverged at step {div['step']}" + (" (inferred from its trajectory)" if div.get("inferred")
                                                          else "")
        else:
            status = "ok" if done >= total else f"unfinished ({done} of {total} step{'s' if total != 1 else ''})"
        rows.append((i, m, ev[-1] if ev else None, traj, status, div))
        curves.append((i, m, traj, div))
    axes = list(members[0]) if members and members[0] else []
    lines = [f"# Sweep `{cfg.name}`", "",
             f"- {len(members)} member{'s' if len(members) != 1 else ''} ({cfg.sweep.mode} over {axes or 'nothing'}), "
             f"{meta['num_devices']} device{'s' if meta['num_devices'] != 1 else ''} in {meta['num_processes']} "
             f"process{'es' if meta['num_processes'] != 1 else ''}, "
             + _grouping_text(meta)]
    if meta.get("members_per_device_lowered"):
        lines.append(f"- members per device lowered: {_lowered_text(meta['members_per_device_lowered'])}")
    if wall_s is not None:
        resumed = meta.get("resumed_from")
        lines.append(f"- wall time: {wall_s:.1f} s" + (f" (of the command that resumed the sweep from step {resumed})"
                                                        if resumed else ""))
    # the losses are those of the member's last evaluation, at the step given (a diverged member's is the one
    # before its divergence: the chunk that diverged is not evaluated)
    lines += ["", "| " + " | ".join(["member", *axes, "eval step", "train loss", "test loss", "test acc", "status"])
              + " |", "|---:|" + "---:|" * len(axes) + "---:|---:|---:|---:|---|"]
    for i, m, last, _, status, _ in rows:
        vals = " | ".join(str(m[a]) for a in axes)
        f = (lambda k: f"{last[k]:.4g}" if last and k in last else "-")  # noqa: E731
        lines.append(f"| {i:03d} | {vals}{' | ' if axes else ''}{last['step'] if last else '-'} | "
                     f"{f('train_loss')} | {f('test_loss')} | {f('test_accuracy')} | {status} |")
    text = "\n".join(lines) + "\n"
    with durable_write(os.path.join(workdir, "summary.md")) as f:
        f.write(text)
    if plots:
        plt = _plt()
        os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, m, traj, div in curves:
            if "loss" in traj and len(traj["loss"]):
                label = f"{i:03d} " + ", ".join(f"{k}={v}" for k, v in m.items())
                ax.plot(traj["step"], traj["loss"], lw=0.8, **marked(traj["loss"]),
                        label=label + (f" (diverged at step {div['step']})" if div else ""))
        ax.set_yscale("log")
        top = _loss_axis_top([(traj, div) for _, _, traj, div in curves])
        if top is not None:
            ax.set_ylim(top=top)
        ax.set_xlabel("step")
        ax.set_title("training loss per member", fontsize=9)
        if ax.lines and len(curves) <= 16:  # (no curve yet: a sweep reported before its first chunk)
            ax.legend(fontsize=5)
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, "plots", "loss.png"), dpi=90)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r for r in rows if r[2] is not None and r[5] is None]  # (a diverged member's losses predate it)
        if xs and axes:
            key = axes[0] if "lr" not in axes else "lr"
            for k in ("test_loss", "train_loss"):
                ax.plot([m[key] for _, m, *_ in xs], [last.get(k, np.nan) for _, _, last, *_ in xs], "o", label=k)
            ax.set_xlabel(key)
            if key == "lr":
                ax.set_xscale("log")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no evaluated members to compare", ha="center", transform=ax.transAxes)
        ax.set_title("last evaluated losses by member (diverged members left out)", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, "plots", "final.png"), dpi=90)
        plt.close(fig)
    return text
