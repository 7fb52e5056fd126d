"""``sweep``: the config's sweep as one vmapped, jitted program, sharded over every device of every host.

Members differ by ``seed`` (initialisation and batch order), ``lr`` / ``weight_decay`` / ``momentum`` (injected
hyperparameters in the optimiser state: no recompilation per value), ``init_gauge`` (scale of the random
re-gauging at init) and ``batch_size`` (the largest batch is drawn and smaller ones are masked prefixes, see
:func:`quotient_sgd.data.batch_fn`).  The member axis is sharded over a 1-D ``jax.sharding.Mesh`` of all devices
(``jax.devices()`` spans every process after ``jax.distributed.initialize``); each process writes the run
directories of the members that live on its devices.

How many members run side by side on one device is chosen from the measured cost of the model (see
:func:`choose_members_per_device`): batching small models amortises per-step overhead (many times faster than a
loop over runs), while a model whose single step already fills the cores gains nothing and is run in smaller
groups, so a sweep is never slower than running its members one after another.
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

from .. import data as qdata
from ..config import SWEEP_AXES, Settings, SweepSettings
from ..optim import flatten_trajectory
from ._build import Built, batch_key, build
from ._chunk import chunk_step, hyper as _hyper, init_state
from ._run import chunk_bounds, first_divergence, scalar_rows
from ._rundir import MetricsLog, RunDirError, TrajectoryParts, config_diff, write_json


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


def _state_axes(b: Built):
    """vmap axes of ``(params, opt_state)``: 0 everywhere except integer step counters, which are identical for
    every member and stay unbatched.  That keeps the ``lax.cond`` of periodic observables (``count % every``,
    Hessian every K steps) a real branch under ``vmap`` instead of a ``select`` that would evaluate the expensive
    branch at every step for every member."""
    shapes = jax.eval_shape(lambda: init_state(b, jnp.int32(0), jnp.float32(0), _hyper(b, 0.1, 0.0, 0.0)))
    return jax.tree.map(lambda x: None if (x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer)) else 0, shapes)


@functools.lru_cache(maxsize=32)
def sweep_programs(b: Built, num_steps: int, padded_batch: int | None, mesh: Mesh):
    """Jitted, vmapped ``init(seed, gauge, lr, wd, momentum)`` and ``chunk(params, opt_state, seed, batch_size,
    dataset, start)`` with the member axis sharded over ``mesh``."""
    mem, rep = NamedSharding(mesh, P("sweep")), NamedSharding(mesh, P())
    axes = _state_axes(b)
    shard = jax.tree.map(lambda a: rep if a is None else mem, axes, is_leaf=lambda a: a is None)

    def one_init(seed, gauge, lr, wd, mom):
        return init_state(b, seed, gauge, _hyper(b, lr, wd, mom))

    init = jax.jit(jax.vmap(one_init, out_axes=axes), in_shardings=(mem,) * 5, out_shardings=shard)
    bs_axis = 0 if padded_batch is not None else None
    pa, oa = axes
    chunk = jax.jit(
        jax.vmap(functools.partial(chunk_step, b, num_steps, padded_batch), in_axes=(pa, oa, 0, bs_axis, None, None),
                 out_axes=(pa, oa, 0, 0)),
        in_shardings=(shard[0], shard[1], mem, mem if padded_batch is not None else None, rep, rep),
        out_shardings=(shard[0], shard[1], mem, mem))
    return init, chunk


def _global(x: np.ndarray, sharding) -> jax.Array:
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _local_rows(x: jax.Array) -> dict[int, np.ndarray]:
    """``{member index within the group: its slice}`` for the shards this process holds."""
    out = {}
    for sh in x.addressable_shards:
        start = sh.index[0].start or 0
        data = np.asarray(sh.data)
        for j in range(data.shape[0]):
            out[start + j] = data[j]
    return out


# ---- choosing the number of members per device ------------------------------------------------------------------
def _plain_step_time(b: Built, m: int, steps: int = 10, repeats: int = 3) -> float:
    """Seconds per step of ``m`` vmapped plain training steps (loss, gradient, optimiser; no observables) on
    one device: the measured cost the grouping decision is based on."""
    import optax

    from ._build import make_inner_optimizer

    tx = make_inner_optimizer(b.settings)
    bs = b.settings.data.batch_size
    bf = qdata.batch_fn(b.dataset, bs if bs > 0 else None)

    def run(seeds, ds):
        def one(seed):
            params = jax.tree.map(lambda x: x, _init_plain(b, seed))
            st = tx.init(params)

            def body(c, step):
                p, s = c
                batch = qdata.batch_fn(ds, bs if bs > 0 else None)(step, jax.random.fold_in(batch_key(seed), step))
                g = jax.grad(b.loss_fn)(p, batch)
                u, s = tx.update(g, s, p)
                return (optax.apply_updates(p, u), s), None

            (p, _), _ = jax.lax.scan(body, (params, st), jnp.arange(steps))
            return jax.tree.leaves(p)[0].sum()

        return jax.vmap(one)(seeds)

    del bf
    f = jax.jit(run)
    seeds = jnp.arange(m, dtype=jnp.int32)
    jax.block_until_ready(f(seeds, b.dataset))
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(seeds, b.dataset))
        best = min(best, time.perf_counter() - t)
    return best / steps


def _init_plain(b: Built, seed):
    from flax import nnx

    from ._build import make_model

    model = make_model(b.settings, nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 0)))
    return nnx.split(model, nnx.Param, ...)[1]


def choose_members_per_device(b: Built, max_per_device: int) -> tuple[int, dict[int, float]]:
    """The number of members to vmap on one device, from measured step times.

    Times the model's plain training step (loss, gradient, optimiser update; :func:`_plain_step_time`) with one
    member and with all ``max_per_device`` members vmapped.  If batching all of them is at least 10% cheaper per member
    (a margin over timing noise on a loaded machine), all are batched: the quotient observables added on top are many small operations that batching speeds up even
    more than the step itself.  Otherwise (a step that already fills the cores) a chunk of ``max_per_device // 4``
    members is timed too and the cheapest per member wins, ``1`` (a loop over members, exactly the cost of
    sequential runs) unless a group is at least 10% cheaper.  (Three small compilations at most: the measurement
    must cost little next to the sweep.)  Returns ``(m, {m: seconds per member-step})``."""
    if max_per_device <= 1:
        return 1, {}
    costs: dict[int, float] = {1: _plain_step_time(b, 1)}
    costs[max_per_device] = _plain_step_time(b, max_per_device) / max_per_device
    if costs[max_per_device] <= 0.9 * costs[1]:
        return max_per_device, costs
    m = max_per_device // 4
    if m >= 2:  # one intermediate group size: a chunk of the members
        costs[m] = _plain_step_time(b, m) / m
    best = 1
    for k in sorted(costs):
        if costs[k] < 0.9 * costs[best]:
            best = k
    return best, costs


# ---- the sweep ------------------------------------------------------------------------------------------------
def _check_sweep_dir(workdir: str, s: Settings) -> None:
    path = os.path.join(workdir, "sweep.json")
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)["config"]
        diff = config_diff(old, s.to_dict())
        if diff:
            lines = "; ".join(f"{k}: {a!r} (in the directory) != {b!r} (now)" for k, (a, b) in diff.items())
            raise RunDirError(f"sweep directory {workdir!r} holds a sweep of a different config ({lines}). "
                              f"Choose another --workdir, or delete the directory.")
    elif os.path.isdir(workdir) and os.listdir(workdir):
        raise RunDirError(f"sweep directory {workdir!r} exists, is not empty and has no sweep.json; refusing to "
                          f"write into it. Choose another --workdir.")


def sweep(settings: Settings, workdir: str, *, members_per_device: int | None = None, devices=None,
          plots: bool | None = None) -> SweepResult:
    """Run the sweep of ``settings`` into ``workdir``: ``sweep.json``, ``members/<i>/`` (one run directory per
    member), ``summary.md`` (the table) and ``plots/*.png`` (comparisons).

    Args:
        members_per_device: override the measured choice (``sweep.members_per_device`` otherwise; 0 = measure).
        devices: devices of the mesh (default: ``jax.devices()``, every device of every process).
    """
    t0 = time.time()
    s = settings
    members = sweep_members(s)
    _check_sweep_dir(workdir, s)
    b = build(s)
    devices = list(jax.devices() if devices is None else devices)
    nd = len(devices)
    mesh = Mesh(np.array(devices), ("sweep",))
    n = len(members)
    per_dev_max = math.ceil(n / nd)
    mpd = members_per_device or s.sweep.members_per_device
    costs: dict[int, float] = {}
    if not mpd:
        mpd, costs = choose_members_per_device(b, per_dev_max)
    mpd = max(1, min(mpd, per_dev_max))
    group = mpd * nd
    leader = jax.process_index() == 0
    if leader:
        os.makedirs(workdir, exist_ok=True)
        write_json(os.path.join(workdir, "sweep.json"), {
            "config": s.to_dict(), "members": members, "num_devices": nd, "num_processes": jax.process_count(),
            "members_per_device": mpd, "measured_step_cost_per_member_s": {str(k): v for k, v in costs.items()}})

    def val(i, axis, default):
        return members[i].get(axis, default) if i < n else members[n - 1].get(axis, default)

    padded = max(s.sweep.batch_size) if s.sweep.batch_size else None
    mem, rep = NamedSharding(mesh, P("sweep")), NamedSharding(mesh, P())
    dataset = jax.tree.map(lambda x: _global(np.asarray(x), rep), b.dataset)
    every = s.checkpoint.every
    diverged: dict[int, dict] = {}
    dirs = [os.path.join(workdir, "members", f"{i:03d}") for i in range(n)]
    from tqdm import tqdm

    bar = tqdm(total=s.steps * n, unit="member-step", desc=f"{s.name} sweep ({n} members, {nd} devices, "
               f"{mpd}/device)", disable=not (s.logging.progress and leader), dynamic_ncols=True)
    for g0 in range(0, n, group):
        idx = list(range(g0, g0 + group))
        arr = lambda axis, default, dt: _global(np.array([val(i, axis, default) for i in idx], dt), mem)  # noqa: E731
        seeds = arr("seed", s.seed, np.int32)
        init, _ = sweep_programs(b, every, padded, mesh)
        params, opt_state = init(seeds, arr("init_gauge", s.init_gauge, np.float32),
                                 arr("lr", s.optim.lr, np.float32), arr("weight_decay", s.optim.weight_decay,
                                                                        np.float32),
                                 arr("momentum", s.optim.momentum, np.float32))
        bsz = arr("batch_size", s.data.batch_size, np.int32) if padded is not None else None
        local: dict[int, tuple] = {}
        for i in idx:
            if i >= n:
                continue
            ms = member_settings(s, i, members[i])
            local[i] = (ms, None, None)
        owned: set[int] = set()
        for a, c in chunk_bounds(0, s.steps, every):
            _, chunk = sweep_programs(b, c - a, padded, mesh)
            start = _global(np.asarray(a, np.int32), rep)
            params, opt_state, traj, ev = chunk(params, opt_state, seeds, bsz, dataset, start)
            trajl = {k: _local_rows(v) for k, v in flatten_trajectory(traj).items()}
            evl = {k: _local_rows(v) for k, v in ev.items()}
            for j in trajl["loss"]:
                i = g0 + j
                if i >= n or i in diverged:
                    continue
                if i not in owned:
                    owned.add(i)
                    _start_member_dir(dirs[i], local[i][0])
                t = {k: v[j] for k, v in trajl.items()}
                t["step"] = np.arange(a, c, dtype=np.int64)
                e = {k: v[j] for k, v in evl.items()}
                dv = first_divergence(t["loss"], bool(e["params_finite"]), a)
                if dv is not None:
                    t = {k: v[: dv["step"] - a + 1] for k, v in t.items()}
                    diverged[i] = dv
                ms = local[i][0]
                rows = scalar_rows(t, a, s.logging.every, (c - 1) if dv is None else dv["step"])
                if rows and dv is None:
                    rows[-1].update({k: v for k, v in e.items() if k != "params_finite"})
                TrajectoryParts(dirs[i]).write(a, t)
                MetricsLog(os.path.join(dirs[i], "metrics.jsonl")).append(rows)
            bar.update((c - a) * min(group, n - g0))
            if all(i in diverged for i in owned) and owned:
                break
        for i in sorted(owned):
            _finish_member(dirs[i], local[i][0], diverged.get(i), plots if plots is not None else s.logging.plots)
    bar.close()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("quotient_sgd_sweep_done")
    wall = time.time() - t0
    res = SweepResult(workdir, n, members, dirs, diverged, mpd, nd, wall)
    if leader:
        report_sweep(workdir, wall_s=wall, plots=plots if plots is not None else s.logging.plots)
    return res


def _start_member_dir(d: str, ms: Settings) -> None:
    import shutil

    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    write_json(os.path.join(d, "config.json"), ms.to_dict())


def _finish_member(d: str, ms: Settings, diverged: dict | None, plots: bool) -> None:
    from ._report import finalize

    traj = TrajectoryParts(d).assemble(os.path.join(d, "trajectory.npz"))
    finalize(d, dataclasses.replace(ms, logging=dataclasses.replace(ms.logging, plots=plots)), traj,
             diverged=diverged, wall_s=None, resumed_from=None)


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
             + (f"; measured cost per member-step (s) by members per device: {meta['measured_step_cost_per_member_s']}"
                if meta.get("measured_step_cost_per_member_s") else "")]
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
