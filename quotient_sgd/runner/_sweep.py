"""``sweep``: the config's sweep as one vmapped, jitted program, sharded over every device of every host.

Members differ by ``seed`` (initialisation and batch order), ``lr`` / ``weight_decay`` / ``momentum`` (injected
hyperparameters in the optimiser state: no recompilation per value), ``init_gauge`` (scale of the random
re-gauging at init) and ``batch_size`` (the largest batch is drawn and smaller ones are masked prefixes, see
:mod:`quotient_sgd.runner._batches`).  The member axis is sharded over a 1-D ``jax.sharding.Mesh`` of all devices
(``jax.devices()`` spans every process after ``jax.distributed.initialize``); each process writes the run
directories of the members that live on its devices.

How many members run side by side on one device is chosen from the measured cost of the model (see
:func:`choose_members_per_device`): batching small models amortises per-step overhead (many times faster than a
loop over runs), while a model whose single step already fills the cores gains nothing and runs one member at a
time through the very program a single ``run`` compiles.  Members advance chunk by chunk together: after every
chunk of ``checkpoint.every`` steps each member's rows are written and *one* orbax checkpoint holds every
member's state, so a sweep killed at any moment resumes from its last checkpoint, like a run.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..config import SWEEP_AXES, Settings, SweepSettings
from ..optim import flatten_trajectory
from ._batches import batch_fn
from ._build import Built, batch_key, build, init_model, make_inner_optimizer
from ._chunk import chunk_step, hyper as _hyper, init_state, single_programs
from ._run import chunk_bounds, first_divergence, scalar_rows
from ._rundir import (
    Checkpoints,
    MetricsLog,
    RunDirError,
    TrajectoryParts,
    config_diff,
    remove_outputs,
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


def sweep_members(s: Settings) -> list[dict[str, Any]]:
    """The members of ``s.sweep``: ``[{axis: value}, ...]`` (product or zip of the non-empty axes)."""
    axes = s.sweep.axes()
    if not axes:
        return [{}]
    names = list(axes)
    combos = itertools.product(*axes.values()) if s.sweep.mode == "product" else zip(*axes.values())
    return [dict(zip(names, c)) for c in combos]


def member_settings(s: Settings, i: int, member: dict) -> Settings:
    """The plain run a member is: the sweep's settings with the member's values, and no sweep."""
    m = s.replace(**{SWEEP_AXES[a]: v for a, v in member.items()})
    return dataclasses.replace(m, name=f"{s.name}-{i:03d}", sweep=SweepSettings())


# ---- programs ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _state_shapes(b: Built):
    return jax.eval_shape(lambda: init_state(b, jnp.int32(0), jnp.float32(0), _hyper(b, 0.1, 0.0, 0.0)))


def _state_axes(b: Built):
    """vmap axes of ``(params, opt_state, model_state)``: 0 everywhere except integer step counters, which are
    identical for every member and stay unbatched.  That keeps the ``lax.cond`` of periodic observables
    (``count % every``, Hessian every K steps) a real branch under ``vmap`` instead of a ``select`` that would
    evaluate the expensive branch at every step for every member (``tests/test_runner_sweep.py`` checks the
    compiled program)."""
    return jax.tree.map(lambda x: None if (x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer)) else 0,
                        _state_shapes(b))


@functools.lru_cache(maxsize=32)
def sweep_programs(b: Built, num_steps: int, padded_batch: int | None, mesh: Mesh):
    """The jitted, vmapped ``chunk(state, seed, batch_size, dataset, start)`` with the member axis sharded over
    ``mesh``."""
    mem, rep = NamedSharding(mesh, P("sweep")), NamedSharding(mesh, P())
    axes = _state_axes(b)
    shard = jax.tree.map(lambda a: rep if a is None else mem, axes, is_leaf=lambda a: a is None)
    bs_axis = 0 if padded_batch is not None else None
    return jax.jit(
        jax.vmap(functools.partial(chunk_step, b, num_steps, padded_batch), in_axes=(axes, 0, bs_axis, None, None),
                 out_axes=(axes, 0, 0)),
        in_shardings=(shard, mem, mem if padded_batch is not None else None, rep, rep),
        out_shardings=(shard, mem, mem))


def _group_state(b: Built, member_state, idx: list[int], mesh: Mesh):
    """The state of a vmapped group of members (rows ``idx``) as global arrays sharded over ``mesh``, assembled
    from ``member_state(i)`` (one member's state on the host, from the unbatched init program: the batched init
    would be a second, larger compilation).  Only the rows this process holds are initialised here."""
    leaves, treedef = jax.tree.flatten(_state_shapes(b))
    mem, rep = NamedSharding(mesh, P("sweep")), NamedSharding(mesh, P())
    out = []
    for k, x in enumerate(leaves):
        if x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer):  # step counters: equal for all, unbatched
            out.append(_global(np.asarray(jax.tree.leaves(member_state(idx[0]))[k]), rep))
            continue

        def rows(index, k=k):
            sel = range(*index[0].indices(len(idx)))
            return np.stack([jax.tree.leaves(member_state(idx[r]))[k] for r in sel])

        out.append(jax.make_array_from_callback((len(idx),) + x.shape, mem, rows))
    return jax.tree.unflatten(treedef, out)


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


def _host_rows(tree, batched: bool) -> dict:
    """``tree`` on the host: numpy leaves with the member axis first (all of it when the arrays are addressable
    from this process, else ``{row: leaf row}`` dicts of the rows held here)."""
    leaves, treedef = jax.tree.flatten(tree)
    if not batched:
        return jax.tree.unflatten(treedef, [np.asarray(x)[None] for x in jax.device_get(leaves)])
    if all(x.is_fully_addressable for x in leaves):
        return jax.tree.unflatten(treedef, jax.device_get(leaves))
    out = []
    for x in leaves:
        rows = {}
        for sh in x.addressable_shards:
            start = sh.index[0].start or 0
            data = np.asarray(sh.data)
            for j in range(data.shape[0]):
                rows[start + j] = data[j]
        out.append(rows)
    return jax.tree.unflatten(treedef, out)


# ---- choosing the number of members per device ------------------------------------------------------------------
def _best_time(f, *args, repeats: int = 3) -> float:
    out = jax.block_until_ready(f(*args))
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    del out
    return best


@functools.lru_cache(maxsize=1)
def machine_flop_rate() -> float:
    """Floating-point operations per second of the default device, measured on a 256^3 float32 matrix product
    (the size of one layer of the models this runs; milliseconds, one tiny compilation)."""
    a = jnp.full((256, 256), 0.5, jnp.float32)
    return 2 * 256**3 / _best_time(jax.jit(lambda a: a @ a), a, repeats=5)


def _plain_step_cost(b: Built, padded_batch: int | None, steps: int = 4) -> tuple[float, float]:
    """``(seconds, flops)`` of one plain training step (batch sampling, loss, gradient, optimiser update;
    no observables) of one member: measured time, and XLA's cost analysis of the step (the scan body is counted
    once).  The state starts at a constant fill: the cost does not depend on the values."""
    import optax

    tx = make_inner_optimizer(b.settings)
    bs = padded_batch or (b.settings.data.batch_size or None)

    def steps_fn(state, seed, dataset):
        bf = batch_fn(dataset, bs)
        key = batch_key(seed)

        def body(carry, step):
            p, st, ms = carry
            batch = bf(step, jax.random.fold_in(key, step))
            if b.stateful:
                (_, (_, ms)), g = jax.value_and_grad(b.loss_fn, has_aux=True)(p, ms, batch)
            else:
                g = jax.grad(b.loss_fn)(p, batch)
            u, st = tx.update(g, st, p)
            return (optax.apply_updates(p, u), st, ms), None

        return jax.lax.scan(body, state, jnp.arange(steps))[0]

    def init():
        p, ms = init_model(b, 0, 0.0)
        return p, tx.init(p), ms

    state = jax.tree.map(lambda s: np.full(s.shape, 0.01 if jnp.issubdtype(s.dtype, jnp.floating) else 0, s.dtype),
                         jax.eval_shape(init))
    f = jax.jit(steps_fn).lower(state, jnp.int32(0), b.dataset).compile()
    cost = f.cost_analysis() or {}
    seconds = _best_time(f, state, jnp.int32(0), b.dataset, repeats=2) / steps
    return seconds, float(cost.get("flops", 0.0))


@functools.lru_cache(maxsize=16)
def choose_members_per_device(b: Built, max_per_device: int, padded_batch: int | None = None,
                              ) -> tuple[int, dict[str, Any]]:
    """The number of members to vmap on one device (all, a quarter of them, or one), from measured costs.

    Batching ``m`` members amortises what a step spends beyond its arithmetic (dispatch of many small
    operations, loops, launches) and nothing of the arithmetic itself.  So the decision compares the measured
    time of one member's plain training step, ``t`` (:func:`_plain_step_cost`: sampling, loss, gradient,
    optimiser; one small compilation and a few steps), with the time its arithmetic needs at this machine's
    measured rate (:func:`machine_flop_rate`), ``t_a = flops / rate``: with
    ``f = t_a / t`` the fraction that batching cannot amortise, ``m`` members cost at best
    ``s(m) = 1 / (f + (1 - f) / m)`` times less per member.  All members are batched when ``s(all) >= 2``, a
    quarter of them when ``s(all / 4) >= 1.5``, else one member at a time runs through the program of a single
    run (a step that already fills the cores: batching it measured no faster, and slower for large groups).
    The margins absorb the cost of batched arithmetic and the noise of a loaded machine; the quotient
    observables added on top of the plain step are many small operations, which batching amortises best.
    Returns ``(m, measurements)``; measured once per program structure and process."""
    if max_per_device <= 1:
        return 1, {}
    t, flops = _plain_step_cost(b, padded_batch)
    t_arith = flops / machine_flop_rate()
    f = min(1.0, t_arith / t)
    gain = {m: 1.0 / (f + (1.0 - f) / m) for m in sorted({max_per_device, max(1, max_per_device // 4)})}
    quarter = max_per_device // 4
    if gain[max_per_device] >= 2.0:
        m = max_per_device
    elif quarter >= 2 and gain[quarter] >= 1.5:
        m = quarter
    else:
        m = 1
    return m, {"step_s": t, "arithmetic_s": t_arith, "flops": flops,
               "unamortised_fraction": f, "predicted_gain": {str(k): v for k, v in gain.items()}}


# ---- the run directory of a sweep -------------------------------------------------------------------------------
def _pack(states: list):
    """The checkpointed form of the groups' states: one tree with the groups stacked on the host (few large
    leaves: orbax's cost grows with the number of leaves), or, across processes, the list of global arrays."""
    if jax.process_count() > 1:
        return states
    return jax.tree.map(lambda *xs: np.stack(jax.device_get(xs)), *states)


def _unpack(packed, templates: list) -> list:
    if jax.process_count() > 1:
        return packed
    return [jax.tree.map(lambda p, t: jax.device_put(p[g], t.sharding), packed, tg) for g, tg in enumerate(templates)]


def _check_sweep_dir(workdir: str, s: Settings) -> dict | None:
    """The ``sweep.json`` of this sweep when ``workdir`` holds it (a sweep to resume), ``None`` for a new or
    empty directory; :class:`RunDirError` for a directory of anything else (nothing is written)."""
    path = os.path.join(workdir, "sweep.json")
    if os.path.isfile(path):
        with open(path) as f:
            meta = json.load(f)
        diff = config_diff(meta["config"], s.to_dict())
        if diff:
            lines = "; ".join(f"{k}: {a!r} (in the directory) != {b!r} (now)" for k, (a, b) in diff.items())
            raise RunDirError(f"sweep directory {workdir!r} holds a sweep of a different config ({lines}). "
                              f"Choose another --workdir, or delete the directory.")
        return meta
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise RunDirError(f"sweep directory {workdir!r} exists, is not empty and has no sweep.json; refusing to "
                          f"write into it. Choose another --workdir.")
    return None


def _checkpoint_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _open_member_dir(d: str, ms: Settings, start: int) -> dict | None:
    """Create (or reopen at checkpoint ``start``) a member's run directory; returns its divergence when it
    diverged before ``start``."""
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "config.json")
    if not os.path.exists(cfg):
        write_json(cfg, ms.to_dict())
    TrajectoryParts(d).truncate(start)
    MetricsLog(os.path.join(d, "metrics.jsonl")).truncate(start)
    remove_outputs(d)
    div_path = os.path.join(d, "diverged.json")
    if os.path.exists(div_path):
        with open(div_path) as f:
            div = json.load(f)
        if div["step"] < start:
            return div
        os.remove(div_path)
    return None


def _finish_member(d: str, ms: Settings, diverged: dict | None, plots: bool) -> None:
    from ._report import finalize

    traj = TrajectoryParts(d).assemble(os.path.join(d, "trajectory.npz"))
    finalize(d, dataclasses.replace(ms, logging=dataclasses.replace(ms.logging, plots=plots)), traj,
             diverged=diverged, wall_s=None, resumed_from=None)


# ---- the sweep ------------------------------------------------------------------------------------------------
def sweep(settings: Settings, workdir: str, *, members_per_device: int | None = None, devices=None,
          plots: bool | None = None, max_chunks: int | None = None) -> SweepResult:
    """Run the sweep of ``settings`` into ``workdir``: ``sweep.json``, ``members/<i>/`` (one run directory per
    member), ``checkpoints/`` (every member's state after every chunk), ``summary.md`` (the table) and
    ``plots/*.png`` (comparisons).  A directory holding this sweep resumes from its last checkpoint (with the
    recorded grouping of members, so the trajectories equal those of an uninterrupted sweep).

    Args:
        members_per_device: override the measured choice (``sweep.members_per_device`` otherwise; 0 = measure).
        devices: devices of the mesh (default: ``jax.devices()``, every device of every process).
        max_chunks: stop after that many chunks (tests).
    """
    t0 = time.time()
    s = settings
    members = sweep_members(s)
    n = len(members)
    old = _check_sweep_dir(workdir, s)  # raises before anything is written
    b = build(s)
    devices = list(jax.devices() if devices is None else devices)
    nd = len(devices)
    mesh = Mesh(np.array(devices), ("sweep",))
    per_dev_max = math.ceil(n / nd)
    leader = jax.process_index() == 0
    every = s.checkpoint.every
    padded = max(s.sweep.batch_size) if s.sweep.batch_size else None
    resuming = old is not None and s.checkpoint.enabled and bool(_checkpoint_steps(workdir))
    costs: dict = {}
    if resuming:
        if (old["num_devices"], old["num_processes"]) != (nd, jax.process_count()):
            raise RunDirError(
                f"sweep directory {workdir!r} was checkpointed with {old['num_devices']} device(s) in "
                f"{old['num_processes']} process(es), now {nd} in {jax.process_count()}: its checkpoints hold the "
                f"members in that layout. Resume with the same devices, or choose another --workdir.")
        mpd = int(old["members_per_device"])
        costs = old.get("measured_cost", {})
    else:
        mpd = members_per_device or s.sweep.members_per_device
        if not mpd:
            mpd, costs = choose_members_per_device(b, per_dev_max, padded)
        mpd = max(1, min(mpd, per_dev_max))
        if jax.process_count() > 1:  # timings differ between processes: the leader's choice holds for all
            from jax.experimental import multihost_utils

            mpd = int(multihost_utils.broadcast_one_to_all(np.int32(mpd)))
    if leader:
        os.makedirs(workdir, exist_ok=True)
        write_json(os.path.join(workdir, "sweep.json"), {
            "config": s.to_dict(), "members": members, "num_devices": nd, "num_processes": jax.process_count(),
            "members_per_device": mpd, "measured_cost": costs})

    group = mpd * nd
    groups = [list(range(g0, g0 + group)) for g0 in range(0, n, group)]
    # one device, one member at a time, every member on the same batch size: the unbatched program of `run`
    batched = not (group == 1 and padded is None)
    mem, rep = NamedSharding(mesh, P("sweep")), NamedSharding(mesh, P())
    dataset = jax.tree.map(lambda x: _global(np.asarray(x), rep), b.dataset) if batched else b.dataset

    def val(i, axis, default):
        return members[min(i, n - 1)].get(axis, default)

    def inputs(idx):
        def arr(axis, default, dt):
            x = np.array([val(i, axis, default) for i in idx], dt)
            return _global(x, mem) if batched else jnp.asarray(x[0])

        seeds = arr("seed", s.seed, np.int32)
        bsz = arr("batch_size", s.data.batch_size, np.int32) if padded is not None else None
        return seeds, bsz

    def chunk_program(num_steps):
        return sweep_programs(b, num_steps, padded, mesh) if batched else single_programs(b, num_steps)[1]

    ins = [inputs(idx) for idx in groups]
    init1, _ = single_programs(b, every)
    host_states: dict[int, Any] = {}

    def member_state(i):
        if i not in host_states:
            m = members[min(i, n - 1)]
            host_states[i] = jax.device_get(init1(
                jnp.int32(m.get("seed", s.seed)), jnp.float32(m.get("init_gauge", s.init_gauge)),
                jnp.float32(m.get("lr", s.optim.lr)), jnp.float32(m.get("weight_decay", s.optim.weight_decay)),
                jnp.float32(m.get("momentum", s.optim.momentum))))
        return host_states[i]

    if batched:
        states = [_group_state(b, member_state, idx, mesh) for idx in groups]
    else:
        states = [jax.device_put(member_state(idx[0])) for idx in groups]
    host_states.clear()
    owned = [[j for j in (_owned_rows(mem, group) if batched else [0]) if idx[j] < n] for idx in groups]
    dirs = [os.path.join(workdir, "members", f"{i:03d}") for i in range(n)]
    ckpt = Checkpoints(workdir, s.checkpoint.keep) if s.checkpoint.enabled else None
    start = 0
    if ckpt is not None:
        start, packed = ckpt.restore_latest(_pack(states))
        if start:
            states = _unpack(packed, states)
    diverged: dict[int, dict] = {}
    for g, idx in enumerate(groups):
        for j in owned[g]:
            i = idx[j]
            dv = _open_member_dir(dirs[i], member_settings(s, i, members[i]), start)
            if dv is not None:
                diverged[i] = dv

    from tqdm import tqdm

    bar = tqdm(total=s.steps * n, initial=start * n, unit="member-step",
               desc=f"{s.name} sweep ({n} members, {nd} devices, {mpd}/device)",
               disable=not (s.logging.progress and leader), dynamic_ncols=True)

    def write_chunk(a, c, outs, states_c):
        """Rows and parts of chunk ``[a, c)`` for the members held here, then the checkpoint of step ``c``."""
        for g, out in enumerate(outs):
            if out is None:
                continue
            traj, ev = _host_rows(flatten_trajectory(out[0]), batched), _host_rows(out[1], batched)
            for j in owned[g]:
                i = groups[g][j]
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
                MetricsLog(os.path.join(dirs[i], "metrics.jsonl")).append(rows)
                if dv is not None:
                    diverged[i] = dv
                    write_json(os.path.join(dirs[i], "diverged.json"), dv)
        if ckpt is not None:
            ckpt.save(c, _pack(states_c))
        bar.update((c - a) * n)

    chunks = chunk_bounds(start, s.steps, every)
    if max_chunks is not None:
        chunks = chunks[:max_chunks]
    pending = None
    done = start
    try:
        for a, c in chunks:
            # dispatch the chunk of every group (asynchronous), then write the previous chunk while it computes
            chunk = chunk_program(c - a)
            start_arr = _global(np.asarray(a, np.int32), rep) if batched else jnp.int32(a)
            outs = []
            for g, idx in enumerate(groups):
                if jax.process_count() == 1 and all(i in diverged for i in idx if i < n):
                    outs.append(None)
                    continue
                seeds, bsz = ins[g]
                states[g], traj, ev = chunk(states[g], seeds, bsz, dataset, start_arr)
                outs.append((traj, ev))
            if pending is not None:
                write_chunk(*pending)
                done = pending[1]
            pending = (a, c, outs, list(states))
            if jax.process_count() == 1 and len(diverged) == n:
                break
        if pending is not None:
            write_chunk(*pending)
            done = pending[1]
    finally:
        bar.close()
        if ckpt is not None:
            ckpt.close()
    finished = done >= s.steps or len(diverged) == n
    plots = plots if plots is not None else s.logging.plots
    if finished:
        for g, idx in enumerate(groups):
            for j in owned[g]:
                _finish_member(dirs[idx[j]], member_settings(s, idx[j], members[idx[j]]), diverged.get(idx[j]), plots)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("quotient_sgd_sweep_done")
    wall = time.time() - t0
    res = SweepResult(workdir, n, members, dirs, diverged, mpd, nd, wall, start, done, costs)
    if leader and finished:
        report_sweep(workdir, wall_s=wall, plots=plots)
    return res


def _fmt_s(t: float) -> str:
    return f"{t * 1e6:.0f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def report_sweep(workdir: str, *, wall_s: float | None = None, plots: bool = True) -> str:
    """The sweep table (``summary.md``) and comparison plots (``plots/loss.png``, ``plots/final.png``)."""
    from ._report import _plt, load_run

    with open(os.path.join(workdir, "sweep.json")) as f:
        meta = json.load(f)
    members = meta["members"]
    rows = []
    curves = []
    for i, m in enumerate(members):
        d = os.path.join(workdir, "members", f"{i:03d}")
        if not os.path.exists(os.path.join(d, "config.json")):
            rows.append((i, m, None, None, "missing"))
            continue
        _, traj, metrics, events = load_run(d)
        ev = [r for r in metrics if "test_loss" in r]
        div = next((e for e in events if e["kind"] == "divergence" and e.get("details", {}).get("ended_run")), None)
        status = f"diverged at step {div['step']}" if div else "ok"
        rows.append((i, m, ev[-1] if ev else None, traj, status))
        curves.append((i, m, traj))
    axes = list(members[0]) if members and members[0] else []
    lines = [f"# Sweep `{meta['config']['name']}`", "",
             f"- {len(members)} members ({meta['config']['sweep']['mode']} over {axes or 'nothing'}), "
             f"{meta['num_devices']} devices in {meta['num_processes']} process(es), "
             f"{meta['members_per_device']} member(s) per device"
             + (f" (chosen from a plain step of {_fmt_s(meta['measured_cost']['step_s'])}, of which "
                f"{meta['measured_cost']['unamortised_fraction']:.0%} is arithmetic that batching cannot amortise)"
                if meta.get("measured_cost") else "")]
    if wall_s is not None:
        lines.append(f"- wall time: {wall_s:.1f} s")
    lines += ["", "| member | " + " | ".join(axes) + " | train loss | test loss | test acc | status |",
              "|---:|" + "---:|" * len(axes) + "---:|---:|---:|---|"]
    for i, m, last, _, status in rows:
        vals = " | ".join(str(m[a]) for a in axes)
        f = (lambda k: f"{last[k]:.4g}" if last and k in last else "-")  # noqa: E731
        lines.append(f"| {i:03d} | {vals}{' | ' if axes else ''}{f('train_loss')} | {f('test_loss')} | "
                     f"{f('test_accuracy')} | {status} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(text)
    if plots:
        plt = _plt()
        os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, m, traj in curves:
            if "loss" in traj and len(traj["loss"]):
                ax.plot(traj["step"], traj["loss"], lw=0.8, label=f"{i:03d} " + ", ".join(f"{k}={v}" for k, v in m.items()))
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("training loss per member", fontsize=9)
        if len(curves) <= 16:
            ax.legend(fontsize=5)
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, "plots", "loss.png"), dpi=90)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r for r in rows if r[2] is not None]
        if xs and axes:
            key = axes[0] if "lr" not in axes else "lr"
            for k in ("test_loss", "train_loss"):
                ax.plot([m[key] for _, m, *_ in xs], [last.get(k, np.nan) for _, _, last, *_ in xs], "o", label=k)
            ax.set_xlabel(key)
            if key == "lr":
                ax.set_xscale("log")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no finished members to compare", ha="center", transform=ax.transAxes)
        ax.set_title("final losses by member", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, "plots", "final.png"), dpi=90)
        plt.close(fig)
    return text
