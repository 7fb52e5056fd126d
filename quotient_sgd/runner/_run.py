"""``run``: a config-driven training run writing its run directory, resumable after SIGKILL."""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import operator
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

from ..config import Settings
from ..optim import flatten_trajectory
from ._build import Built, build, check_init_gauge, require_max_chunks, require_settings
from ._chunk import hyper_of, init_program, single_programs, to_host
from ._memory import check_run_memory
from ._rundir import (
    Checkpoints,
    MetricsLog,
    TrajectoryParts,
    check_workdir,
    checkpoint_steps,
    directory_path,
    discard_new_run,
    finished_trajectory,
    lock_directory,
    make_directory,
    remove_outputs,
    sigint_deferred,
    unlock_directory,
    write_config,
)


@dataclasses.dataclass
class RunResult:
    workdir: str
    steps_done: int
    diverged: dict | None
    trajectory: dict
    wall_s: float
    resumed_from: int


class ChunkBounds(collections.abc.Sequence):
    """The chunks ``[a, b)`` from ``start`` to ``total``, aligned to multiples of ``every`` (the same boundaries
    whatever the resume point), computed on demand: a schedule of ``2^31`` one-step chunks takes no memory (a
    list of them was built before the first step, 2^31 tuples).  Slicing keeps it lazy (``chunks[:k]``)."""

    def __init__(self, start: int, total: int, every: int):
        self.start, self.total, self.every = int(start), int(total), int(every)
        self._first = min((self.start // self.every + 1) * self.every, self.total)
        self._n = 0 if self.start >= self.total else 1 + -(-(self.total - self._first) // self.every)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            lo, hi, stride = i.indices(self._n)
            if stride != 1:
                return [self[k] for k in range(lo, hi, stride)]
            if hi <= lo:
                return ChunkBounds(self.start, self.start, self.every)
            return ChunkBounds(self[lo][0], self[hi - 1][1], self.every)
        k = operator.index(i)
        k = k + self._n if k < 0 else k
        if not 0 <= k < self._n:
            raise IndexError(f"chunk {i} of {self._n}")
        if k == 0:
            return self.start, self._first
        a = self._first + (k - 1) * self.every
        return a, min(a + self.every, self.total)

    def __eq__(self, other) -> bool:
        if isinstance(other, ChunkBounds):
            return len(self) == len(other) and (not len(self) or (self[0], self[-1]) == (other[0], other[-1]))
        return isinstance(other, (list, tuple)) and len(other) == len(self) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"ChunkBounds(start={self.start}, total={self.total}, every={self.every}: {len(self)} chunks)"


def chunk_bounds(start: int, total: int, every: int) -> ChunkBounds:
    """Chunks ``[a, b)`` aligned to multiples of ``every`` (the same boundaries whatever the resume point), as a
    lazy sequence (:class:`ChunkBounds`)."""
    return ChunkBounds(start, total, every)


def scalar_rows(traj: dict[str, np.ndarray], start: int, every: int, last: int) -> list[dict]:
    """Metric rows of the logged steps of a chunk: every scalar-per-step observable (flattened keys)."""
    flat = {k: v for k, v in traj.items() if v.ndim == 1 and k != "step"}
    n = len(traj["step"])
    rows = []
    for i in range(n):
        step = start + i
        if step % every == 0 or step == last:
            rows.append({"step": step, **{k: v[i] for k, v in flat.items()}})
    return rows


def expected_rows(start: int, every: int, log_every: int) -> tuple[list[int], set[int]]:
    """``(steps, chunk ends)``: the steps before ``start`` that a run writes a ``metrics.jsonl`` row for (the
    multiples of ``logging.every`` and the last step of every chunk, :func:`scalar_rows`), and the chunk ends among
    them (their rows also hold the chunk's evaluation, ``test_loss`` ..., which the trajectory parts do not)."""
    ends = {c - 1 for _, c in chunk_bounds(0, start, every)}
    return sorted(set(range(0, start, log_every)) | ends), ends


def mend_metrics(s: Settings, metrics: MetricsLog, parts: TrajectoryParts, ckpt, start: int, state, fresh,
                 evaluate_at=None):
    """``(start, state)`` to resume from, after writing again the rows of ``metrics.jsonl`` before ``start`` that
    the file lacks (a row cut or deleted before the newest checkpoint: a hand edit, a faulty file system; a resume
    dropped it without a word).  A lacking chunk-end row (its evaluation is in no other file) is computed again:
    the run resumes from the start of its chunk when a checkpoint of that step is kept (or it is step 0 and the
    run is no longer than the kept checkpoints span), recomputing the same rows bit for bit (not with
    ``ckpt=None``: a sweep member's directory, whose checkpoint holds every member).  The other lacking
    rows are rewritten from the trajectory parts, which hold every per-step value of a row exactly.  The evaluation
    of a chunk end rewritten so is a pure function of the state the chunk ended at; ``evaluate_at(ends)``
    (:func:`chunk_end_evaluations`: from the checkpoint of that step when it is kept, else replayed from an earlier
    one or from the initial state, bit for bit; a sweep member's, in the grouping of the chunk that computed it)
    computes it again, ``{chunk end: (evaluation, how)}``.  A chunk end whose evaluation cannot be computed (no
    ``evaluate_at``: a member of a sweep across processes; a checkpoint that does not restore) keeps its per-step
    values and loses its evaluation.  Each case is named in a ``RuntimeWarning``; no row is
    written twice."""
    import warnings

    every = s.checkpoint.every
    wanted, ends = expected_rows(start, every, s.logging.every)
    have = metrics.steps()
    missing = [k for k in wanted if k not in have]
    if not missing:
        return start, state
    where = f"{metrics.path} lacks the rows of steps {_steps_text(missing)} before the checkpoint of step {start}"
    lost_eval = [k for k in missing if k in ends]
    if lost_eval and ckpt is not None:
        a0 = lost_eval[0] // every * every  # (the start of its chunk: chunks are aligned to multiples of every)
        kept = set(checkpoint_steps(os.path.dirname(metrics.path)))
        restored = None
        if a0 in kept or (a0 == 0 and start <= s.checkpoint.keep * every):
            try:
                restored = ckpt.restore(a0, state) if a0 else fresh()
            except Exception:  # noqa: BLE001  (a checkpoint that does not restore: the rows come from the parts)
                restored = None
        if restored is not None:
            state = restored
            for k in sorted(kept):
                if k > a0:
                    ckpt.manager.delete(k)
            parts.truncate(a0)
            metrics.truncate(a0)
            warnings.warn(f"{where} (a hand edit or a faulty file system); resuming from step {a0} to compute "
                          f"them again", RuntimeWarning, stacklevel=3)
            missing = [k for k in missing if k < a0]
            start = a0
            lost_eval = [k for k in lost_eval if k < a0]
            if not missing:
                return start, state
            where = f"{metrics.path} lacks the rows of steps {_steps_text(missing)} before step {start}"
    rows, gone = [], []
    for k in missing:
        part = parts.part_holding(k)
        if part is None:
            gone.append(k)
            continue
        i = int(np.flatnonzero(np.asarray(part["step"]) == k)[0])
        rows.append({"step": k, **{n: v[i] for n, v in part.items() if v.ndim == 1 and n != "step"}})
    evals, eval_error = {}, ""
    eval_ends = [r["step"] + 1 for r in rows if r["step"] in ends]
    if eval_ends and evaluate_at is not None:
        try:
            evals = evaluate_at(eval_ends)
        except Exception as e:  # noqa: BLE001  (a checkpoint that does not restore: the evaluation stays lost)
            eval_error = f" (computing it again failed: {type(e).__name__}: {e})"
    for r in rows:
        if r["step"] + 1 in evals and r["step"] in ends:
            r.update(evals[r["step"] + 1][0])
    if rows:
        metrics.insert(rows)
    eval_done = [r["step"] for r in rows if r["step"] in ends and r["step"] + 1 in evals]
    eval_lost = [r["step"] for r in rows if r["step"] in ends and r["step"] + 1 not in evals]
    msg = f"{where} (a hand edit or a faulty file system)"
    if rows:
        msg += f"; rewrote the rows of steps {_steps_text([r['step'] for r in rows])} from the trajectory parts"
    if eval_done:
        how = "; ".join(f"step {k}: {evals[k + 1][1]}" for k in eval_done[:10])
        msg += (f", with the evaluation (test_loss, ...) of steps {_steps_text(eval_done)} computed again from the "
                f"state its chunk ended at ({how})")
    if eval_lost:
        msg += (f", without the evaluation (test_loss, ...) of steps {_steps_text(eval_lost)}: it is held in no "
                f"other file, and it could not be computed again{eval_error}")
    if gone:
        msg += f"; no trajectory part holds steps {_steps_text(gone)}: their rows are lost"
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return start, state


def first_missing_part(run_dir: str, end: int, every: int) -> int | None:
    """The first chunk ``[a, b)`` before step ``end`` (chunks of ``every`` steps) whose trajectory part
    ``run_dir/trajectory_parts/part_<a>.npz`` is missing or does not load (:meth:`TrajectoryParts.readable`: a
    part a crash of the machine left torn failed the resume when it assembled ``trajectory.npz``, after computing
    the rest, and every command after it), ``None`` when there is none; a sweep member that diverged (its
    ``diverged.json``) needs the chunks up to its divergence only."""
    from ._rundir import read_divergence

    div = read_divergence(run_dir, "run directory")
    parts = TrajectoryParts(run_dir)
    have = set(parts._starts())
    for a, _ in chunk_bounds(0, end, every):
        if div is not None and a > div["step"]:
            return None
        if a not in have or not parts.readable(a):
            return a
    return None


def lost_trajectory(run_dir: str, s: Settings, diverged: dict | None) -> int | None:
    """The first chunk whose steps a finished run (or one ended by ``diverged``) holds in no file, ``None`` when
    its ``trajectory.npz`` loads or its trajectory parts hold every chunk: a ``trajectory.npz`` torn by a crash of
    the machine, with ``trajectory_parts/`` removed (a finished run no longer reads them), was assembled again
    from no part, an empty trajectory written over it, and the run's plots and summary redrawn from it ("0
    steps"), exit status 0."""
    import zipfile

    path = os.path.join(run_dir, "trajectory.npz")
    try:
        with zipfile.ZipFile(path) as z:
            if "step.npy" in z.namelist() and z.testzip() is None:
                return None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError):
        pass  # removed or torn: the parts make it again, when they hold every chunk
    end = s.steps if diverged is None else int(diverged["step"]) + 1
    return first_missing_part(run_dir, end, s.checkpoint.every)


def resume_point(kept: list[int], first_missing: int) -> int:
    """The step a resume restarts from when the trajectory parts lack the chunk starting at ``first_missing``: the
    newest of the ``kept`` checkpoints at or before it, else step 0."""
    return max((k for k in kept if k <= first_missing), default=0)


def rewind_to_parts(s: Settings, metrics: MetricsLog, parts: TrajectoryParts, ckpt: Checkpoints, start: int, state,
                    fresh) -> tuple[int, object]:
    """``(start, state)`` to resume from when the trajectory parts do not reach the checkpoint of ``start``: a
    chunk before it has no ``trajectory_parts/part_<a>.npz``.  A command with ``checkpoint.enabled=False`` starts
    again from step 0 and drops the parts and rows of the directory, but keeps the checkpoints an earlier command
    wrote; interrupted, and resumed with checkpoints on, the run restored that newer checkpoint, so the steps
    between the parts and it were in no file (their rows "lost", a trajectory with a gap of 20 of its 40 steps).
    It resumes instead from the newest kept checkpoint at or before the first chunk without a part (step 0, the
    initial state ``fresh()``, when there is none), after deleting the newer checkpoints and the parts and rows
    from that step on: the same steps are computed again (deterministic), with a ``RuntimeWarning`` naming them.
    Unchanged when every chunk before ``start`` has its part."""
    import warnings

    first = first_missing_part(os.path.dirname(parts.dir), start, s.checkpoint.every)
    if first is None:
        return start, state
    kept = sorted(ckpt.manager.all_steps())
    base = resume_point(kept, first)
    state = ckpt.restore(base, state) if base else fresh()
    for k in kept:
        if k > base:
            ckpt.manager.delete(k)
    parts.truncate(base)
    metrics.truncate(base)
    warnings.warn(f"{parts.dir} has no part of the chunk from step {first} on, before the checkpoint of step "
                  f"{start} (a command with checkpoint.enabled=False started the run again from step 0 and was "
                  f"stopped, or the part was removed, or it does not load); resuming from "
                  + (f"the checkpoint of step {base}" if base else "step 0")
                  + f" instead, to compute steps {base} to {start - 1} again", RuntimeWarning, stacklevel=3)
    return base, state


def chunk_end_evaluations(b: Built, s: Settings, ckpt: Checkpoints, template, fresh, ends: list[int]) -> dict:
    """``{c: (evaluation, how)}``: the evaluation (``test_loss``, ...; :func:`~._chunk.evaluation`) of the state
    at each chunk end ``c`` in ``ends`` (steps before the newest checkpoint), as the chunk ending at ``c`` computed
    it, bit for bit, and ``how`` it was obtained.  The state at ``c`` is the checkpoint of ``c`` when one is kept;
    otherwise it is replayed (the same chunk programs, on the same chunk boundaries: a deterministic computation)
    from the newest kept checkpoint before ``c``, or from the initial state ``fresh()``.  Consecutive ends share one
    replay.  ``template``: a state of the run's structure (for :meth:`Checkpoints.restore`)."""
    from ._chunk import eval_program

    kept = set(ckpt.manager.all_steps())
    evaluate, seed, every = eval_program(b), jnp.int32(s.seed), s.checkpoint.every
    out: dict[int, tuple[dict, str]] = {}
    at, state, origin = None, None, None  # (the replay's position, its state, where it started)
    for c in sorted(set(ends)):
        if c in kept:
            st, how = ckpt.restore(c, template), f"the checkpoint of step {c}"
        else:
            k = max((x for x in kept if x < c), default=0)
            if at is None or not k <= at <= c:
                at, state, origin = k, (ckpt.restore(k, template) if k else fresh()), k
            for a, cc in chunk_bounds(at, c, every):
                state = single_programs(b, cc - a)(state, seed, None, b.dataset, jnp.int32(a))[0]
            at, st = c, state
            how = (f"steps {origin} to {c} replayed from "
                   + (f"the checkpoint of step {origin}" if origin else "the initial state"))
        ev = to_host(evaluate(st, b.dataset))
        out[c] = ({k: v for k, v in ev.items() if k != "params_finite"}, how)
    return out


def _steps_text(steps: list[int]) -> str:
    return str(steps) if len(steps) <= 10 else f"{str(steps[:10])[:-1]}, ... ({len(steps)} steps)]"


def first_divergence(loss: np.ndarray, params_finite: bool, start: int) -> dict | None:
    bad = ~np.isfinite(loss)
    if bad.any():
        i = int(np.argmax(bad))
        return {"step": start + i, "reason": f"non-finite loss ({loss[i]})"}
    if not params_finite:
        return {"step": start + len(loss) - 1, "reason": "non-finite parameters"}
    return None


def _progress(s: Settings, initial: int):
    if not s.logging.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=s.steps, initial=initial, unit="step", desc=s.name, dynamic_ncols=True, file=sys.stderr,
                smoothing=0.3)


def require_tensorboard(s: Settings) -> None:
    """A :class:`~quotient_sgd.config.ConfigError` naming ``logging.tensorboard`` when it asks for TensorBoard
    logging and ``tensorboardX`` cannot be imported: raised by :func:`run` and ``sweep`` before anything is built
    or written (the writer is opened only once the model is built and the directory written)."""
    if not s.logging.tensorboard:
        return
    try:
        import tensorboardX  # noqa: F401
    except ImportError as e:
        from ..config import ConfigError

        raise ConfigError(f"config.logging.tensorboard = True: needs tensorboardX, which cannot be imported ({e}); "
                          "install it (pip install 'quotient_sgd[tensorboard]') or set "
                          "logging.tensorboard=False") from None


def _tensorboard(s: Settings, workdir: str, resumed_from: int = 0):
    """The TensorBoard writer of a run directory (``None`` unless ``logging.tensorboard``).  A run resumed from
    step ``c > 0`` writes, first, the rows of ``metrics.jsonl`` before ``c`` (already truncated there), under
    ``purge_step=0``: TensorBoard then hides every value written before (those of steps ``>= c`` are written again,
    and those before ``c`` were written by an earlier command only if it had ``logging.tensorboard`` on, which a
    resume may change), so it shows the rows of ``metrics.jsonl``, each once (rows of steps before the command
    that turned it on were missing).  A run that starts again from step 0 over the event files of an earlier
    command (one stopped before its first checkpoint, or run with ``checkpoint.enabled=False``) purges from step 0
    too: that command's rows are written again by this one, and TensorBoard showed both (12 points of a key logged in
    9 rows, a 30-step run stopped after 10 steps once).
    Each writer gets its own file (the name's suffix: two writers started within the same second would otherwise
    share, and truncate, one file)."""
    if not s.logging.tensorboard:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("logging.tensorboard=True needs tensorboardX: "
                           "pip install 'quotient_sgd[tensorboard]'") from e
    logdir = os.path.join(workdir, "tensorboard")
    earlier = os.path.isdir(logdir) and any(f.startswith("events.out.tfevents") for f in os.listdir(logdir))
    tb = SummaryWriter(logdir, purge_step=0 if resumed_from or earlier else None,
                       filename_suffix=f".{time.time_ns()}")
    if resumed_from:
        from ._rundir import read_metrics

        write_tensorboard(tb, [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
                               if r["step"] < resumed_from])
    return tb


def write_tensorboard(tb, rows: list[dict]) -> None:
    """The metric rows (as appended to ``metrics.jsonl``) as TensorBoard scalars: one tag per key, at its step.
    Non-finite values are left out (an observable not defined for the run, e.g. ``charge_drift_predicted``
    under Adam, is NaN at every step; tensorboardX would warn on each; ``metrics.jsonl`` keeps them)."""
    for r in rows:
        for k, v in r.items():
            if k != "step" and math.isfinite(x := float(v)):
                tb.add_scalar(k, x, r["step"])
    tb.flush()


def run(settings: Settings, workdir: str, *, max_chunks: int | None = None) -> RunResult:
    """Train the validated ``settings`` into ``workdir`` (created, or resumed when it holds this config).

    Writes ``config.json``, ``metrics.jsonl`` (rows as chunks finish), ``checkpoints/`` (after every chunk of
    ``checkpoint.every`` steps), then ``trajectory.npz``, ``events.json``, ``plots/*.png`` and ``summary.md``.
    A non-finite loss or parameter ends the run cleanly: the step and the reason go to ``events.json`` and
    ``summary.md``.  ``max_chunks`` stops after that many chunks (tests).

    A new run that fails with an exception before its first chunk is written leaves nothing behind: what this
    call created is removed (the directory itself when this call created it), so the corrected command can run
    into the same ``workdir``.  A directory being resumed is never removed.  The call holds a lock on ``workdir``
    (:func:`~._rundir.lock_directory`): a second call on the same directory while one runs is refused
    (:class:`RunDirError`) and changes nothing.  ``logging.tensorboard=True`` without ``tensorboardX`` is refused
    first (:class:`~quotient_sgd.config.ConfigError`).
    """
    t0 = time.time()
    s = settings
    require_settings(s, "run", "settings")  # (before the directory is looked at)
    require_max_chunks(max_chunks, "run")
    workdir = directory_path(workdir, "run")
    require_tensorboard(s)
    check_workdir(workdir, s)  # raises before anything is written
    b = build(s)  # (cached: runs that differ only in program inputs share one Built)
    check_run_memory(b, s)  # (its trajectory and, on an accelerator, a chunk: before anything is computed)
    check_init_gauge(b, [("init_gauge", s.init_gauge, [s.seed])])  # (the same function, re-gauged)
    created = not os.path.isdir(workdir)
    make_directory(workdir)
    lock = lock_directory(workdir)
    try:
        resume = check_workdir(workdir, s)  # again, locked: another call may have written it in the meantime
        progress = {"chunks": 0}
        try:
            return _run(s, workdir, b, resume, max_chunks, t0, progress)
        except BaseException:
            if not resume and not progress["chunks"]:
                discard_new_run(workdir, created)
            raise
    finally:
        unlock_directory(lock)


def _run(s: Settings, workdir: str, b: Built, resume: bool, max_chunks: int | None, t0: float,
         progress: dict) -> RunResult:
    write_config(os.path.join(workdir, "config.json"), s)  # (a resume may change the keys that compute nothing)
    metrics, parts = MetricsLog(os.path.join(workdir, "metrics.jsonl")), TrajectoryParts(workdir)
    every = s.checkpoint.every
    if s.logging.plots:
        from ._report import prefetch_plotting

        prefetch_plotting()
    init = init_program(b, s.init_gauge > 0)
    state = init(jnp.int32(s.seed), jnp.float32(s.init_gauge), *hyper_of(s))
    ckpt = tb = bar = None
    diverged = None
    try:
        ckpt = Checkpoints(workdir, s.checkpoint.keep) if s.checkpoint.enabled else None
        start = 0
        if ckpt is not None:
            start, restored = ckpt.restore_latest(state)
            state = restored if start else state
        from ._report import RECORD, read_record

        previous = read_record(workdir) if resume else None  # before remove_outputs deletes it
        # a run that diverged has ended: run again, it computes nothing (as a finished run) and keeps its record;
        # so does a finished run without the checkpoint of its last step (checkpoints off, or kept elsewhere):
        # run.json is written once its last step is
        diverged = (previous or {}).get("diverged")
        ended = diverged is not None or (resume and os.path.isfile(os.path.join(workdir, RECORD)))
        lost = lost_trajectory(workdir, s, diverged) if ended else None
        if lost is not None:
            # (its trajectory is in no file: computed again, from the checkpoint its parts reach, as a resume would)
            import warnings

            warnings.warn(f"{workdir} holds a finished run whose trajectory.npz does not load, and its trajectory "
                          f"parts lack the chunk from step {lost} on; computing its steps again from the newest kept "
                          f"checkpoint they reach (deterministic: the same trajectory)", RuntimeWarning, stacklevel=3)
            ended, diverged, previous = False, None, None
        if not ended:
            parts.truncate(start)
            metrics.truncate(start)
            fresh = lambda: init(jnp.int32(s.seed), jnp.float32(s.init_gauge), *hyper_of(s))  # noqa: E731
            if start > 0:
                start, state = rewind_to_parts(s, metrics, parts, ckpt, start, state, fresh)
            if start > 0:
                start, state = mend_metrics(s, metrics, parts, ckpt, start, state, fresh, evaluate_at=functools.partial(
                    chunk_end_evaluations, b, s, ckpt, state, fresh))
        todo = [] if ended else chunk_bounds(start, s.steps, every)
        # plots/ goes when it would describe a shorter trajectory than the one this call ends with, or is
        # rewritten; a finished run run again without plots keeps those it has, and keeps its trajectory.npz
        remove_outputs(workdir, plots=bool(todo) or s.logging.plots, trajectory=bool(todo))
        tb = _tensorboard(s, workdir, start) if todo else None
        bar = _progress(s, start)
        done = s.steps if ended and diverged is None else start
        seed = jnp.int32(s.seed)
        for n_chunk, (a, c) in enumerate(todo):
            if max_chunks is not None and n_chunk >= max_chunks:
                break
            chunk = single_programs(b, c - a)
            state, traj, ev = chunk(state, seed, None, b.dataset, jnp.int32(a))
            traj = flatten_trajectory(to_host(traj))
            ev = to_host(ev)
            traj["step"] = np.arange(a, c, dtype=np.int64)
            diverged = first_divergence(traj["loss"], bool(ev["params_finite"]), a)
            if diverged is not None:
                keep = diverged["step"] - a + 1
                traj = {k: v[:keep] for k, v in traj.items()}
            rows = scalar_rows(traj, a, s.logging.every, (c - 1) if diverged is None else diverged["step"])
            if rows and diverged is None:
                rows[-1].update({k: v for k, v in ev.items() if k != "params_finite"})
            parts.write(a, traj)
            metrics.append(rows)
            if tb is not None:
                write_tensorboard(tb, rows)
            if diverged is not None:
                progress["chunks"] += 1
                break
            if ckpt is not None:
                ckpt.save(c, state)
            progress["chunks"] += 1
            done = c
            if bar is not None:
                bar.set_postfix(loss=f"{float(traj['loss'][-1]):.4g}",
                                test=f"{float(ev['test_loss']):.4g}", refresh=False)
                bar.update(c - a)
    finally:
        # (an interrupt while the bar or the writer closes is held back: the checkpoint being written is finalised)
        with sigint_deferred():
            try:
                if bar is not None:
                    bar.close()
                if tb is not None:
                    tb.close()
            finally:
                if ckpt is not None:
                    ckpt.close()
    finished = diverged is not None or done >= s.steps
    # (a call that computed nothing finishes with the trajectory.npz it found, not one the parts make again)
    traj = finished_trajectory(workdir) if finished else parts.load()
    if finished:
        from ._report import finalize

        wall_s, resumed_from = time.time() - t0, start
        # a finished run run again: nothing was computed, its record stands (a record without a wall time is
        # the summary.md that `report` drew of a run killed after its last checkpoint: this call finishes it)
        if not progress["chunks"] and previous is not None and previous.get("wall_s") is not None:
            wall_s, resumed_from = previous.get("wall_s"), previous.get("resumed_from")
        finalize(workdir, s, traj, diverged=diverged, wall_s=wall_s, resumed_from=resumed_from,
                 computed=bool(progress["chunks"]))
    return RunResult(workdir, int(len(traj.get("step", []))), diverged, traj, time.time() - t0, start)
