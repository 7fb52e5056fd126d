"""Detection on a saved run directory and live, chunk by chunk, inside a training loop."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from ._detect import ALL_KINDS, detect
from ._events import Event, save_events
from ._options import check_kinds, check_options
from ._series import _MAX_STEP, check_lr, flatten_trajectory, plain_scalar


def _lr_from_config(cfg: Mapping[str, Any]):
    """Best-effort learning rate from a resolved ``config.json`` (``optim.lr`` / ``optim.learning_rate`` / top
    level); None when the config has none (then pass ``lr=`` explicitly)."""
    for sect in (cfg.get("optim", {}), cfg.get("optimizer", {}), cfg):
        if isinstance(sect, Mapping):
            for k in ("lr", "learning_rate"):
                if isinstance(sect.get(k), (int, float)):
                    return float(sect[k])
    return None


def _whole_training_set(data: Mapping[str, Any]) -> bool:
    """Whether the ``data`` section's ``batch_size`` is the whole training set (the runner draws distinct examples,
    so every batch holds them all: gradient descent, as ``batch_size = 0``).  False where the section does not
    describe a data set the config module knows."""
    import dataclasses

    from ..config._settings import DataSettings
    from ..config._validate import DATASETS, train_size

    names = {f.name for f in dataclasses.fields(DataSettings)}
    if data.get("name") not in DATASETS:
        return False
    try:
        d = DataSettings(**{k: v for k, v in data.items() if k in names})
        return data["batch_size"] >= train_size(d)
    except (TypeError, ValueError, ArithmeticError):
        return False


def _options_from_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The detector settings of a run with config ``cfg`` (``config.json``, ``Settings.to_dict()``): what
    ``quotient-sgd run`` detects its own ``events.json`` with (``quotient_sgd.runner._report.detect_events``) and
    :func:`detect_run` re-detects with.  ``horizon`` = the planned steps; a mini-batch loss (``data.batch_size``
    above 0 and below the training set's size) judged for spikes on a 20-step causal mean (full batch, or a batch
    of the whole training set: the raw loss); SGD's momentum, which moves the
    edge of stability to ``eta lambda = 2 (1 + beta)`` (Nesterov: ``/ (1 + 2 beta)``) and the fold to
    :func:`~quotient_sgd.diagnostics.fold_edge`, and SGD's (coupled) ``weight_decay`` when it is not 0, which
    lowers both by ``lr * weight_decay``; ``adaptive`` and ``b1`` for Adam / AdamW, whose edge of stability
    is one of the preconditioned sharpness at :func:`~quotient_sgd.diagnostics.adam_edge` ``(b1)``, not of
    ``eta lambda_max(H)``, and for AdamW its ``weight_decay`` (decoupled: the edge is ``adam_edge(b1, decay=lr *
    weight_decay)``).  (The configs have no Nesterov Adam: ``optim.nesterov`` is for SGD only.)"""
    out: dict[str, Any] = {}
    if isinstance(cfg.get("steps"), int) and not isinstance(cfg.get("steps"), bool) and cfg["steps"] > 0:
        out["horizon"] = cfg["steps"]
    data = cfg.get("data")
    if isinstance(data, Mapping) and isinstance(data.get("batch_size"), int):
        out["spike_smooth"] = 1 if data["batch_size"] == 0 or _whole_training_set(data) else 20
    optim = cfg.get("optim")
    if isinstance(optim, Mapping) and optim.get("name") == "sgd":
        beta = optim.get("momentum", 0.0)
        if isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 < beta < 1:
            out.update(momentum=float(beta), nesterov=bool(optim.get("nesterov", False)))
        wd = optim.get("weight_decay", 0.0)
        if isinstance(wd, (int, float)) and not isinstance(wd, bool) and 0 < wd < float("inf"):
            out["weight_decay"] = float(wd)
    if isinstance(optim, Mapping) and optim.get("name") in ("adam", "adamw"):
        out["adaptive"] = True
        b1 = optim.get("b1", 0.9)
        if isinstance(b1, (int, float)) and not isinstance(b1, bool) and 0 <= b1 < 1:
            out["b1"] = float(b1)
        wd = optim.get("weight_decay", 0.0)
        if (optim.get("name") == "adamw" and isinstance(wd, (int, float)) and not isinstance(wd, bool)
                and 0 <= wd < float("inf")):
            out["weight_decay"] = float(wd)
    return out


def detect_run(run_dir: str | os.PathLike, *, lr=None, write: bool = True, **options) -> list[Event]:
    """Run :func:`detect` on the trajectory of ``run_dir`` and (``write=True``) write ``run_dir/events.json``.

    The trajectory is :func:`quotient_sgd.runner.load_trajectory`'s: ``trajectory.npz``, or, for a run not
    finished (or killed), its ``trajectory_parts/`` joined in step order (a ``RuntimeWarning`` says which steps
    were read).  The learning rate comes from ``lr`` or, failing that, from ``run_dir/config.json``; so do,
    unless given, the settings the run itself detected with (``horizon`` = the config's ``steps``;
    ``spike_smooth=20`` for a mini-batch loss), so that re-detecting a run directory rewrites the run's own
    events.  A divergence that ended the run, as the runner recorded it (``run.json``, the ``ended_run`` event
    of ``events.json``, a sweep member's ``diverged.json``), is kept: the other detectors read the steps before
    it (as the runner does), and the runner's divergence event, with its reason, is part of the result as the
    runner wrote it (once: re-detecting a run directory rewrites the run's own ``events.json``).  A run killed
    after the trajectory of the chunk that diverged was written but before the divergence was recorded is
    treated alike: its divergence is the first recorded step with a non-finite loss, its reason saying that it
    was inferred from the trajectory (``quotient_sgd.runner._report.run_divergence``).  Sweep
    trajectories (an extra leading sweep axis) are not split here: pass one member's run directory
    (``members/<i>``).

    Raises:
        ValueError: ``write`` not a bool (``"no"`` is truthy: the file was written), or as :func:`detect`.
        FileNotFoundError: ``run_dir`` is a sweep directory (the message names its members' run directories),
            not a run directory, or a run without any recorded step yet.
    """
    import warnings

    if not isinstance(write, (bool, np.bool_)):
        # write="no" (or "False") is truthy: the run's events.json was rewritten although the caller said not to
        raise ValueError(f"detect_run: write={write!r} is not allowed; need True (write run_dir/events.json) or "
                         "False")
    from ..runner._report import run_divergence
    from ..runner._rundir import load_trajectory

    run_dir = os.fspath(run_dir)
    try:
        traj = load_trajectory(run_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"detect_run: {str(e).removeprefix('load_trajectory: ')}") from None
    if not traj:
        raise FileNotFoundError(f"detect_run: run_dir={run_dir!r} has no trajectory yet (neither trajectory.npz "
                                f"nor trajectory parts: the run stopped before its first chunk; running it again "
                                f"computes it)")
    if traj.source != "trajectory.npz":
        warnings.warn(f"detect_run: {run_dir!r} has no trajectory.npz; read {traj.source}", RuntimeWarning,
                      stacklevel=2)
    if os.path.exists(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
        if lr is None:
            lr = _lr_from_config(cfg)
        # without them a mini-batch run's loss noise was re-detected as dozens of loss spikes, overwriting the
        # run's own (empty) events.json
        options = {**_options_from_config(cfg), **options}
    ended = _runner_divergence_event(run_dir, run_divergence(run_dir, traj))
    if ended is None:
        events = detect(traj, lr=lr, **options)
    else:
        # as the runner: the detectors read the steps before the divergence (every event is earlier than it, so
        # none repeats it), and the runner's event states it
        n = len(np.asarray(traj.get("loss", ())))
        rows = np.asarray(traj["step"]) if "step" in traj else np.arange(n)
        keep = rows < ended.step
        before = {k: np.asarray(v)[keep] if np.ndim(v) >= 1 and len(v) == n else v for k, v in traj.items()}
        events = detect(before, lr=lr, **options) if keep.sum() > 0 else []  # (one row too, as the runner)
        events = sorted(events + [ended], key=lambda e: (e.step, e.kind, e.variant))
    if write:
        save_events(os.path.join(run_dir, "events.json"), events)
    return events


def _runner_divergence_event(run_dir: str, diverged: dict | None) -> Event | None:
    """The divergence event the runner wrote for the divergence ``diverged`` (``{"step", "reason"}``) that ended
    the run: its ``ended_run`` event in ``events.json`` as written, else the event the runner writes for it
    (``runner._report.detect_events``); ``None`` without a divergence."""
    if diverged is None:
        return None
    path = os.path.join(run_dir, "events.json")
    if os.path.exists(path):
        with open(path) as f:
            for d in json.load(f):
                if (d.get("kind") == "divergence" and d.get("details", {}).get("ended_run")
                        and int(d.get("step", -1)) == int(diverged["step"])):
                    return Event.from_dict(d)
    return Event(int(diverged["step"]), "divergence", float("inf"), {}, "quotient", True,
                 {"reason": diverged.get("reason", ""), "ended_run": True,
                  **({"inferred": True} if diverged.get("inferred") else {})})


class LiveDetector:
    """Incremental detection: feed trajectory chunks as the runner produces them, get the new events.

    The chunks are concatenated on the host and :func:`detect` is re-run on the whole trajectory so far; events
    already reported are not reported again (``events`` holds them all, sorted as :func:`detect` sorts them), but
    their entries in ``events`` (and in ``path``) are brought up to date: an episode still running at the end of a
    chunk (a loss spike, a level crossing) is reported at its onset with its peak so far, and its ``strength`` (a
    spike's or catapult's peak ratio), ``peak``, ``peak_step`` and ``end_step`` are those of the whole episode once
    later chunks have shown it.  An update costs time proportional to the steps so far (about 6 ms at 2000 steps on
    one CPU core), so that feeding single steps costs time quadratic in the run's length (14 s over 2000 steps):
    feed chunks of tens to thousands of steps.  Set ``horizon`` (planned number of steps) so that the change-point
    block length and threshold are those of the full run: the events are then those of one :func:`detect` call (same
    ``horizon``) on the whole trajectory, whatever the chunk sizes.  Without ``horizon`` both grow with the
    trajectory so far, and ``transition`` events depend on the chunking (the same change point may be reported again
    at another block length).  The ``transition`` level ``alpha`` is split over the keys monitored so far: a key that
    first appears in a later chunk (an observable switched on mid-run, NaN before in the joined trajectory) changes
    the threshold of the others from then on, so that chunks read before it were tested at another level and a
    change point may be reported twice, at two alarm steps (measured: a loss whose rate rises by 25% at step 300,
    ``grad_norm_canonical`` from step 500 on, chunks of 100 steps: in 23 of 40 seeds the live events differ from
    those of one call on the whole run, e.g. steps 340 and 350 for its 350).  Give every chunk the same keys, NaN
    where a key is not recorded yet: the events are then those of the whole run (40 of 40).  With ``path`` the
    cumulative event list is written to ``path`` (an ``events.json``) after every chunk; its directory is created
    when the detector is made, if it does not exist (so an unwritable location, or a ``path`` that is a directory,
    fails there, not at a chunk).  A detector pickled after a chunk and
    loaded in another process (a run resumed there) goes on as if it had not stopped: its chunks and events are in
    the pickle.  A new detector knows nothing of the steps before it: writing to the same ``path`` it replaces the
    events found before (feed it the run's trajectory so far, e.g. ``quotient_sgd.runner.load_trajectory``, as its
    first chunk).

    Example:
        >>> import numpy as np
        >>> live = LiveDetector(kinds=["divergence"])
        >>> live.update({"loss": np.ones(10)})
        []
        >>> [e.kind for e in live.update({"loss": np.array([1.0, np.inf])})]
        ['divergence']
    """

    def __init__(self, *, lr=None, path: str | os.PathLike | None = None, start_step: int = 0, **options):
        # a misspelt option or kind fails here, not at the first chunk (hours into a run)
        # kept as checked: a generator of kinds or keys, consumed by the check, left every update with none
        kinds = None if options.get("kinds") is None else check_kinds(options["kinds"], ALL_KINDS)
        options = check_options({k: v for k, v in options.items() if k != "kinds"}, "LiveDetector")
        if kinds is not None:
            options["kinds"] = kinds
        start_step = plain_scalar(start_step)  # (a 0-d integer array, e.g. a JAX step counter, counts)
        if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)) \
                or not -_MAX_STEP < int(start_step) < _MAX_STEP:
            raise ValueError(f"LiveDetector: start_step={start_step!r} is not allowed; need an integer of magnitude "
                             "< 2**53")
        start_step = int(start_step)
        if lr is not None:  # (a negative or NaN lr failed at the first chunk; its length is checked per chunk)
            check_lr(lr, "LiveDetector")
        if path is not None:  # a path in a directory not made yet (runs/my_run/events.json) failed at the first chunk
            if os.path.isdir(os.fspath(path)):
                # (made, it failed at the first chunk in IsADirectoryError, after that chunk's events were kept)
                raise ValueError(f"LiveDetector: path={os.fspath(path)!r} is a directory; need the path of the events "
                                 f"file, e.g. {os.path.join(os.fspath(path), 'events.json')!r}")
            where = os.path.dirname(os.path.abspath(os.fspath(path)))
            try:
                os.makedirs(where, exist_ok=True)
            except OSError as e:
                # (a bare "FileExistsError: [Errno 17] File exists: 'runs/a'" for runs/a/events.json under a file
                # runs/a, naming neither the argument nor the path given)
                raise ValueError(f"LiveDetector: path={os.fspath(path)!r} is not allowed: its directory {where!r} "
                                 f"cannot be made ({e.strerror or e}); need the path of an events file in a "
                                 "directory that exists or can be made") from None
            if not os.access(where, os.W_OK | os.X_OK):
                raise ValueError(f"LiveDetector: path={os.fspath(path)!r} is not allowed: its directory {where!r} "
                                 "is not writable")
        self.lr = lr
        self.path = path
        self.start_step = start_step
        self.options = options
        self._chunks: list[dict[str, np.ndarray]] = []
        self.events: list[Event] = []

    def update(self, chunk) -> list[Event]:
        """Add ``chunk`` (a trajectory of the next steps, leading axis = step, with a ``loss`` key; or one step as
        scalars, e.g. ``{"loss": 0.3}``) and return the events it reveals.

        Raises:
            KeyError: a chunk without ``loss``.
            ValueError: a chunk whose ``loss`` is not one value per step (a vmapped chunk), or as :func:`detect`
                on the trajectory so far.  In each case nothing is added: the detector goes on as before the
                call."""
        chunk = flatten_trajectory(chunk, "LiveDetector.update")
        if "loss" not in chunk:
            # the other keys of such a chunk were appended with no rows of 'loss' to go with them, and the error
            # came from the next detect call, about a series longer than the loss
            raise KeyError(f"LiveDetector.update: a chunk needs the 'loss' key (one value per step, the rows the "
                           f"other keys are read on); got keys {sorted(chunk)}")
        if chunk["loss"].ndim == 0:  # one step given as scalars: a chunk of one row
            chunk = {k: v[None] for k, v in chunk.items()}
        rows = chunk["loss"].shape[:1]
        for k in ("lr", "learning_rate"):
            # a constant learning rate given once (as detect takes it) holds for each row of the chunk: kept 0-d,
            # the join failed in NumPy's bare "zero-dimensional arrays cannot be concatenated"
            if k in chunk and chunk[k].ndim == 0:
                chunk[k] = np.broadcast_to(chunk[k], rows)
        if chunk["loss"].ndim != 1:
            # its 'loss' was dropped from the joined trajectory (a per-step shape that changes between chunks), and
            # every later update failed in "a trajectory needs at least the 'loss' key"
            raise ValueError(f"LiveDetector.update: a chunk's 'loss' must hold one value per step, shape (steps,); "
                             f"got shape {chunk['loss'].shape}. A vmapped or swept chunk has a leading member axis: "
                             "feed one member per detector, e.g. jax.tree.map(lambda x: x[i], chunk)")
        # a series of another length than the chunk's loss was reported by detect in the joined trajectory's
        # numbers ("'step' key has shape (10,); it must number the rows of 'loss', shape (13,)" for a chunk of 3
        # rows with an empty 'step'), which no chunk held
        other = {k: v.shape for k, v in chunk.items()
                 if v.ndim >= 1 and v.shape[0] != rows[0] and k not in ("lr", "learning_rate")}
        if other:
            raise ValueError(f"LiveDetector.update: every series of a chunk needs one row per row of its 'loss' "
                             f"({rows[0]}, leading axis); got shapes {other}")
        self._chunks.append(chunk)
        try:
            traj = _concatenate(self._chunks, self.start_step)
            lr = self.lr
            if lr is not None and np.ndim(lr) == 1:
                lr = np.asarray(lr)[: len(traj["loss"])]
            found = detect(traj, lr=lr, start_step=self.start_step, **self.options)
        except Exception:
            # a chunk the trajectory so far cannot take (repeated steps, a series of another length) is not kept:
            # kept, it failed every later update as well
            self._chunks.pop()
            raise
        new = []
        # the events reported so far, by key; events that share a key (two slice shocks at one step: the key has no
        # room for what tells them apart) in the order detect gives them, the n-th found matched to the n-th
        # reported (keyed one to one, the second of two slice shocks at a step replaced the first)
        at: dict[tuple, list[int]] = {}
        for i, e in enumerate(self.events):
            at.setdefault(e.key(), []).append(i)
        seen: dict[tuple, int] = {}
        for e in found:
            k = e.key()
            n = seen[k] = seen.get(k, -1) + 1
            if n >= len(at.get(k, ())):
                at.setdefault(k, []).append(len(self.events))
                self.events.append(e)
                new.append(e)
            else:
                # an episode that was still running at the end of an earlier chunk: its onset (the key) is
                # causal, its peak, end and strength are not; kept as first reported, a loss spike cut by a chunk
                # boundary kept the strength of its peak so far (2.20 where detect on the whole run gives 2.34)
                self.events[at[k][n]] = e
        # in detect's order (by step, then kind and variant): kept in the order found, an event confirmed later
        # than a later step's (a catapult confirmed after the next spike's loss_spike) stood after it, so that the
        # list and the file depended on the chunking
        self.events.sort(key=lambda e: (e.step, e.kind, e.variant))
        new.sort(key=lambda e: (e.step, e.kind, e.variant))
        if self.path is not None:
            save_events(self.path, self.events)
        return new


def _concatenate(chunks: list[dict[str, np.ndarray]], start_step: int = 0) -> dict[str, np.ndarray]:
    """The chunks' series end to end.  A key missing from some chunks (recorded from a later chunk on, e.g. an
    observable switched on mid-run) is NaN there (``hessian_step``: -1, no refresh yet) rather than dropped for
    the whole run; ``step`` missing from some chunks numbers their rows as :func:`detect` numbers a trajectory
    without it, ``start_step`` + the row's index (NaN there was refused as "step[0] = nan", a value no chunk
    held); a key whose per-step shape changes between chunks is dropped.  A 0-d value (a run constant
    such as a seed, which :func:`detect` does not read as a series) stays one value, the latest, when every chunk
    holds it so; where other chunks hold it per step, it holds for each row of its chunk."""
    out = {}
    for k in dict.fromkeys(k for c in chunks for k in c):
        have = [np.asarray(c[k]) for c in chunks if k in c]
        # NumPy refused to join 0-d values ("zero-dimensional arrays cannot be concatenated"): a chunk that detect
        # takes as it is (a 0-d key is not a series) failed in LiveDetector.update, first chunk included
        if all(a.ndim == 0 for a in have):
            out[k] = have[-1]
            continue
        def get(c, k=k):
            a = np.asarray(c[k])
            return np.broadcast_to(a, np.shape(c["loss"])[:1]) if a.ndim == 0 else a

        have = [get(c) for c in chunks if k in c]
        trail = {a.shape[1:] for a in have}
        if len(trail) != 1:
            continue
        if len(have) == len(chunks):
            out[k] = np.concatenate(have, axis=0)
            continue
        (shape,) = trail
        parts = []
        row = 0
        for c in chunks:
            n = len(np.asarray(c["loss"])) if "loss" in c else 0
            row += n
            if k == "step" and shape == ():
                parts.append(get(c) if k in c else start_step + np.arange(row - n, row, dtype=np.int64))
            elif k == "hessian_step":
                parts.append(get(c).astype(np.int64) if k in c else np.full((n,) + shape, -1, np.int64))
            else:
                parts.append(get(c).astype(np.float64) if k in c else np.full((n,) + shape, np.nan))
        out[k] = np.concatenate(parts, axis=0)
    return out
