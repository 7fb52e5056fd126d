"""The run directory (DESIGN "The run directory"): config check, metrics log, trajectory parts, checkpoints.

Crash safety (SIGKILL at any instant): after every scan chunk ``[a, b)`` the runner writes, in this order,
(1) ``trajectory_parts/part_<a>.npz`` (temp file + rename), (2) the chunk's ``metrics.jsonl`` rows (appended,
fsynced), (3) the orbax checkpoint of step ``b`` (orbax finalises a step directory atomically).  On resume from
checkpoint ``c``, parts starting at or after ``c`` and metric rows with ``step >= c`` are dropped, so the rows and
parts of an interrupted chunk are recomputed once, never lost, never duplicated.

Every file renamed into place (the parts, ``trajectory.npz``, ``config.json``, ``run.json``, ``events.json``,
``summary.md``, a truncated ``metrics.jsonl``) goes through :func:`~quotient_sgd._durable.durable_write`: it is
fsynced before the rename and its directory after it, so that a crash of the machine (not only a kill of the
process) leaves either the old file or the complete new one, never a renamed but empty or partial file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import signal
import threading
import warnings
from typing import Any

import jax
import numpy as np

from .._durable import durable_write, fsync_directory
from ..config import Settings, unused_keys

#: config keys that may differ between a run and its resumption: they change neither the trajectory nor the
#: metric rows (the progress bar, the TensorBoard copy of the rows, whether plots are drawn, how many checkpoints
#: are kept, whether checkpoints are written: without them a run restarts from step 0 and recomputes the same
#: steps).  The resumed run records the new values in ``config.json``.  ``checkpoint.every`` is not one of them:
#: it sets the chunks, whose last steps carry the evaluation rows.
_IGNORED_KEYS = ("logging.progress", "logging.tensorboard", "logging.plots", "checkpoint.keep",
                 "checkpoint.enabled")


class RunDirError(RuntimeError):
    """A run directory holds a different run (or something that is not a run)."""


def check_trajectory_loaded(report_dir: str, run_dir: str, traj, *, member: bool = False) -> None:
    """Refuse to report ``report_dir`` when the run ``run_dir`` (itself, or a sweep member) has a
    ``trajectory.npz`` that does not load and no trajectory part holds its steps instead (``traj`` empty): the
    plots and summary (a sweep's table) were redrawn from an empty trajectory ("steps: 0 of 6 ... a run stopped
    before its first chunk", a member "unfinished (0 of N steps)") over those drawn from the whole trajectory.
    :class:`RunDirError` naming the file; nothing is written."""
    if traj or not os.path.isfile(os.path.join(run_dir, "trajectory.npz")):
        return
    if member:
        what, kept = f"the trajectory.npz of its member {run_dir!r}", "the sweep's summary.md and plots/ are kept"
        again = ("Restore that trajectory.npz, or run the same `quotient-sgd sweep` command again: it computes the "
                 "lost steps again (deterministic)")
    else:
        what, kept = "its trajectory.npz", "its plots/ and summary.md, drawn from the trajectory before, are kept"
        again = ("Restore trajectory.npz; for a run (not a sweep member), the same `quotient-sgd run` command run "
                 "again computes the lost steps again (deterministic)")
    raise RunDirError(f"cannot report {report_dir!r}: {what} holds no trajectory that loads, and no trajectory part "
                      f"holds its steps instead ({getattr(traj, 'source', '')}); nothing was written: {kept}. "
                      f"{again}")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def absent_defaults(old: dict, new: dict) -> dict[str, Any]:
    """``{dotted key: value}`` of the keys of the config ``new`` that the recorded config ``old`` lacks and that
    hold the schema's default in ``new``: ``old`` was written by a version without these keys.  A key is added to
    the schema with a default that keeps the behaviour of the versions before it, so the absent key reads as that
    default and the run is the same one (:func:`config_diff` does not count it as a difference)."""
    fo, fn, dflt = _flat(old), _flat(new), _flat(Settings().to_dict())
    return {k: fn[k] for k in sorted(fn) if k not in fo and k in dflt and fn[k] == dflt[k]}


def config_diff(a: dict, b: dict, unread=()) -> dict[str, tuple]:
    """``{dotted key: (value in a, value in b)}`` of the keys that differ (ignoring logging-only keys, and the keys
    ``unread`` that the command does not read with ``b`` and ``a`` records: :func:`~quotient_sgd.config.unused_keys`,
    e.g. ``model.channels`` of an MLP or the ``sweep`` section of a run).  ``a`` is the recorded config: a key it
    lacks that holds the schema's default in ``b`` is no difference (:func:`absent_defaults`); one it lacks with
    another value in ``b``, or one ``b`` lacks, is (``"<absent>"``)."""
    fa, fb = _flat(a), _flat(b)
    same = absent_defaults(a, b)
    return {k: (fa.get(k, "<absent>"), fb.get(k, "<absent>")) for k in sorted(set(fa) | set(fb))
            if k not in _IGNORED_KEYS and not (k in unread and k in fa) and k not in same
            and fa.get(k, "<absent>") != fb.get(k, "<absent>")}


def warn_absent_defaults(path: str, old: dict, new: dict) -> None:
    """Warn (the command prints it) that the recorded config at ``path`` lacks keys that the resume reads as their
    defaults (:func:`absent_defaults`); nothing when it lacks none."""
    filled = absent_defaults(old, new)
    if filled:
        keys = ", ".join(f"{k} = {v!r}" for k, v in filled.items())
        warnings.warn(f"{path} was written before the key(s) {list(filled)} existed; resuming with their defaults "
                      f"({keys}), which keep the behaviour of the version that wrote it; the file now records them",
                      stacklevel=2)


#: The keys (and their JSON types) that the readers of a sweep's ``sweep.json`` take from it: ``sweep`` (resuming)
#: its config; ``report`` the members and the devices too.
SWEEP_RECORD_KEYS = {"config": dict}
SWEEP_REPORT_KEYS = {"config": dict, "members": list, "num_devices": int, "num_processes": int}


def read_record_json(path: str, what: str = "directory", keys: dict | None = None) -> dict:
    """The JSON object in ``path``, a record of a run or sweep directory (``config.json``, ``sweep.json``,
    ``run.json``), checked for the shape its readers use: a JSON object, with the ``keys`` given (``{key: type}``;
    ``sweep.json``: :data:`SWEEP_RECORD_KEYS` unless given, its ``members`` a list of objects), a ``config.json``
    with at least one run section.  A file that parses but holds something else (a list, ``null``, another
    program's ``config.json``, a hand-edited copy) raises :class:`RunDirError` naming the file, what it holds and
    what it should (it failed in the readers with a bare ``AttributeError`` / ``KeyError`` / ``TypeError``);
    ``what`` says whose record it is.  A file that does not parse raises ``json.JSONDecodeError`` (the command
    names it)."""
    from ..config._settings import SECTIONS

    with open(path) as f:
        obj = json.load(f)
    name = os.path.basename(path)

    def bad(holds: str) -> RunDirError:
        return RunDirError(f"{what} {os.path.dirname(path)!r}: its {name} {holds}; not a record quotient_sgd wrote "
                           f"(another program's file, or an edited copy). Choose another directory, or remove it")

    if not isinstance(obj, dict):
        raise bad(f"holds a JSON {'null' if obj is None else type(obj).__name__} ({json.dumps(obj)[:60]}), where a "
                  f"JSON object is written")
    need = {dict: "an object", list: "a list", int: "an integer", str: "a string"}
    keys = (SWEEP_RECORD_KEYS if name == "sweep.json" else {}) if keys is None else keys
    for key, typ in keys.items():
        if key not in obj:
            raise bad(f"has no key {key!r} (written with {need[typ]}; the keys read: {sorted(keys)})")
        if not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):
            raise bad(f"has {key!r} = {json.dumps(obj[key])[:60]}, where {need[typ]} is written")
    if isinstance(obj.get("members"), list) and not all(isinstance(m, dict) for m in obj["members"]):
        raise bad(f"has 'members' = {json.dumps(obj['members'])[:60]}, where a list of objects (each member's values) "
                  f"is written")
    if name == "config.json" and not any(isinstance(obj.get(sect), dict) for sect in SECTIONS):
        raise bad(f"has none of the run sections {sorted(SECTIONS)} (its keys: {sorted(obj)[:8]})")
    return obj


def directory_path(workdir, where: str, arg: str = "workdir") -> str:
    """``workdir`` as a ``str`` path (``str``, ``bytes`` or ``os.PathLike``), or a ``TypeError`` naming ``where``,
    its argument ``arg``, the value and what is allowed: ``run(settings, None)`` failed in a bare "stat: path should
    be string, bytes, os.PathLike or integer, not NoneType", and an integer was taken for a file descriptor."""
    if isinstance(workdir, (str, bytes, os.PathLike)):
        path = os.fspath(workdir)
        if isinstance(path, (str, bytes)):
            return os.fsdecode(path)
    default = "; the command's default is runs/<config name>" if where in ("run", "sweep") else ""
    raise TypeError(f"{where}: {arg}={workdir!r} is not a directory path; need a str or os.PathLike (e.g. "
                    f"'runs/NAME'{default}), got {type(workdir).__name__}")


def read_run_record(path: str, what: str = "run directory") -> dict:
    """The ``run.json`` at ``path`` (:func:`read_record_json`), its values checked for what its readers take:
    ``wall_s`` a number or ``null``, ``resumed_from`` an integer or ``null``, ``diverged`` ``null`` or an object
    with an integer ``step`` and a string ``reason``.  Another value (a hand edit) raises :class:`RunDirError`
    naming the file, the key and the value (``"wall_s": "x"`` failed in the summary's "Unknown format code 'f'",
    ``"diverged": [1]`` in a bare ``TypeError``)."""
    obj = read_record_json(path, what)

    def bad(key: str, need: str) -> RunDirError:
        return RunDirError(f"{what} {os.path.dirname(path)!r}: its run.json has {key!r} = "
                           f"{json.dumps(obj.get(key))[:60]}, where {need} is written; not a record quotient_sgd "
                           f"wrote (another program's file, or an edited copy). Choose another directory, or remove "
                           f"it")

    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if obj.get("wall_s") is not None and not number(obj["wall_s"]):
        raise bad("wall_s", "a number of seconds or null")
    if obj.get("resumed_from") is not None and (not isinstance(obj["resumed_from"], int)
                                                or isinstance(obj["resumed_from"], bool)):
        raise bad("resumed_from", "a step (an integer) or null")
    div = obj.get("diverged")
    if div is not None and not (isinstance(div, dict) and isinstance(div.get("step"), int)
                                and not isinstance(div.get("step"), bool) and isinstance(div.get("reason"), str)):
        raise bad("diverged", "null or an object with an integer 'step' and a string 'reason'")
    return obj


def read_divergence(run_dir: str, what: str = "run directory") -> dict | None:
    """The ``{"step", "reason"}`` a sweep member's ``diverged.json`` records, ``None`` when there is none; a file
    that parses but holds something else (a list, an object without an integer ``step`` or a string ``reason``: a
    hand edit) raises :class:`RunDirError` naming it, as :func:`read_record_json` does for the other records (it
    failed in a bare ``TypeError`` / ``KeyError``)."""
    path = os.path.join(run_dir, "diverged.json")
    if not os.path.isfile(path):
        return None
    return read_record_json(path, what, {"step": int, "reason": str})


def check_directory_path(workdir: str, what: str = "run directory") -> None:
    """:class:`RunDirError` when ``workdir`` cannot be a directory: it, or the nearest of its parents that
    exists, is not a directory, or is one this process may not write into (nothing is written)."""
    # (a file given with a trailing slash, "out.txt/", and a link to nothing were "cannot be created: File exists")
    bare = workdir.rstrip(os.sep) or workdir
    if os.path.islink(bare) and not os.path.exists(bare):
        raise RunDirError(f"{what} {workdir!r} is a symbolic link to {os.readlink(bare)!r}, which does not exist. "
                          f"Create the directory it points to, or choose another --workdir.")
    if os.path.lexists(bare) and not os.path.isdir(bare):
        raise RunDirError(f"{what} {workdir!r} exists and is not a directory. Choose another --workdir.")
    if os.path.isdir(workdir):
        if not os.access(workdir, os.W_OK | os.X_OK):
            raise RunDirError(f"{what} {workdir!r} is not writable (permission denied). Choose another --workdir.")
        return
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunDirError(f"{what} {workdir!r} cannot be created: {parent!r} is not a directory. Choose another "
                          f"--workdir.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"{what} {workdir!r} cannot be created: {parent!r} is not writable (permission "
                          f"denied). Choose another --workdir.")


#: The subdirectories of a run (or sweep) directory that its runner writes, prunes and deletes: ``plots/`` is
#: removed and drawn again, ``checkpoints/`` holds orbax's step directories (one that does not restore is deleted),
#: ``trajectory_parts/`` is truncated on resume, ``members/`` holds a sweep's member runs.
_MANAGED_SUBDIRS = ("plots", "checkpoints", "trajectory_parts", "tensorboard", "members")


def _holds_record(directory: str) -> str | None:
    """``"sweep"`` when ``directory`` holds a ``sweep.json`` (as :func:`check_workdir` tells a sweep's member
    directory), ``"run"`` when it holds a run's ``config.json`` (as :func:`read_record_json` reads one: a
    ``config.json`` of another program does not count), else ``None``."""
    if os.path.isfile(os.path.join(directory, "sweep.json")):
        return "sweep"
    path = os.path.join(directory, "config.json")
    if os.path.isfile(path):
        try:
            read_record_json(path)
        except (OSError, ValueError, RunDirError):
            return None
        return "run"
    return None


def check_not_inside_outputs(workdir: str, what: str = "run directory") -> None:
    """:class:`RunDirError` when ``workdir`` lies inside one of the subdirectories that a run or sweep directory's
    runner manages (:data:`_MANAGED_SUBDIRS`: ``<run>/plots/x``, ``<run>/checkpoints/x``, ``<sweep>/members/0/x``,
    ...), also when reached through a symbolic link.  A run written there was deleted without a word by the next
    command on the enclosing directory (running a finished run again removes and redraws its ``plots/``; a resume
    prunes ``checkpoints/`` and ``trajectory_parts/``)."""
    child = os.path.realpath(workdir)
    parent = os.path.dirname(child)
    while parent != child:
        name = os.path.basename(child)
        if name in _MANAGED_SUBDIRS:
            kind = _holds_record(parent)
            if kind is not None:
                raise RunDirError(
                    f"{what} {workdir!r} is in {os.path.join(parent, name)!r}, the {name}/ directory of the "
                    f"{kind} {parent!r}, which that {kind}'s commands write and delete (the next command on it would "
                    f"remove what is written there); refusing to write into it. Choose a --workdir outside that "
                    f"{kind} directory.")
        child, parent = parent, os.path.dirname(parent)


def make_directory(workdir: str, what: str = "run directory") -> None:
    """``os.makedirs(workdir, exist_ok=True)``, its failure (a read-only file system, a name too long, ...) as a
    :class:`RunDirError` naming the directory and the reason; the parents it created before failing are removed."""
    first_new = None
    path = os.path.abspath(workdir)
    while not os.path.exists(path):
        first_new, path = path, os.path.dirname(path)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        if first_new is not None:
            shutil.rmtree(first_new, ignore_errors=True)
        raise RunDirError(f"{what} {workdir!r} cannot be created: {e.strerror or e}. Choose another "
                          f"--workdir.") from e


def check_workdir(workdir: str, settings: Settings) -> bool:
    """Decide, before anything is written, whether ``workdir`` is new (False) or this run's to resume (True).

    Raises :class:`RunDirError` naming the directory and the differing keys when it holds another config, when it
    is a non-empty directory without a ``config.json``, or when it is a sweep's member directory
    (``<sweep>/members/<i>`` beside a ``sweep.json``: written by its sweep, whose lock is on the sweep directory,
    so a run there could write into it while the sweep does), also when reached through a symbolic link."""
    check_directory_path(workdir)
    parent = os.path.dirname(os.path.realpath(workdir))  # (a link to a member directory, or to its members/)
    if os.path.basename(parent) == "members" and os.path.isfile(os.path.join(os.path.dirname(parent), "sweep.json")):
        raise RunDirError(f"run directory {workdir!r} is a member directory of the sweep "
                          f"{os.path.dirname(parent)!r} (it has a sweep.json): its sweep writes it; refusing to write "
                          f"into it. Resume the sweep with 'quotient-sgd sweep', or choose another --workdir.")
    check_not_inside_outputs(workdir)
    cfg_path = os.path.join(workdir, "config.json")
    if os.path.isfile(cfg_path):
        old = read_record_json(cfg_path, "run directory")
        diff = config_diff(old, settings.to_dict(), unused_keys(settings, "run"))
        if diff:
            lines = "; ".join(f"{k}: {a!r} (in the directory) != {b!r} (now)" for k, a, b in
                              ((k, *v) for k, v in diff.items()))
            raise RunDirError(
                f"run directory {workdir!r} holds a run of a different config ({len(diff)} differing keys: "
                f"{lines}). Choose another --workdir, or delete the directory to start over.")
        if os.path.isfile(os.path.join(workdir, "run.json")):  # (read on resume: refused before anything is done)
            read_run_record(os.path.join(workdir, "run.json"), "run directory")
        warn_absent_defaults(cfg_path, old, settings.to_dict())
        return True
    if os.path.isfile(os.path.join(workdir, "sweep.json")):
        raise RunDirError(f"run directory {workdir!r} holds a sweep (sweep.json), not a run; refusing to write "
                          f"into it. Run 'quotient-sgd sweep' on it, or choose another --workdir.")
    if foreign_entries(workdir, "config.json"):
        raise RunDirError(f"run directory {workdir!r} exists, is not empty and has no config.json: not a "
                          f"quotient_sgd run; refusing to write into it. Choose another --workdir.")
    return False


def foreign_entries(workdir: str, record: str) -> list[str]:
    """The entries of ``workdir`` (a directory without its ``record`` file, ``config.json`` or ``sweep.json``)
    other than ``<record>.tmp``: the temporary file of a new run killed while writing its record is what that run
    wrote, not another's data, and the same command starts the run again over it.  Empty when ``workdir`` does not
    exist."""
    if not os.path.isdir(workdir):
        return []
    return sorted(n for n in os.listdir(workdir) if n != record + ".tmp")


#: The directories whose lock :func:`lock_directory` could not take (no ``flock`` on their file system): each
#: is warned about once per process.
_UNLOCKED_WARNED: set[str] = set()


def lock_directory(workdir: str, what: str = "run directory") -> int | None:
    """Take an exclusive lock on the directory ``workdir`` (``flock`` on the directory itself: no file is added
    to it) for the call that writes into it; :func:`unlock_directory` (or the end of the process) releases it.
    :class:`RunDirError` when another process (a run, a sweep) holds it: two calls writing into one directory
    would both append every metric row and race on the checkpoints.  ``None`` where the file system refuses the
    lock (no ``flock``: ``ENOLCK``, ``EOPNOTSUPP``, ``ENOSYS`` on some network file systems, or another
    ``OSError``): the directory is then used unlocked, and a ``RuntimeWarning`` naming it and the reason is
    issued (once per directory and process), since nothing then stops a second command writing into it.

    A multi-host sweep takes it in process 0 only (its other processes go on only if process 0's checks and lock
    succeeded); whether it also keeps out a command started on another host is the shared file system's
    (``flock`` on NFS is forwarded as a POSIX lock; some file systems lock per host only).  The lock lives as long
    as process 0: where process 0 ends first (killed, interrupted), the other processes may still write what they
    had in flight (a chunk's rows, checkpoint shards) until they end, unlocked."""
    import fcntl

    fd = os.open(workdir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirError(f"{what} {workdir!r} is in use: another process is writing into it (a run or sweep "
                          f"still running). Wait for it to end (the same command then resumes the run, or finds "
                          f"it finished), or choose another --workdir.") from None
    except OSError as e:
        os.close(fd)
        key = os.path.abspath(workdir)
        if key not in _UNLOCKED_WARNED:
            _UNLOCKED_WARNED.add(key)
            name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else type(e).__name__
            warnings.warn(f"{what} {workdir!r} cannot be locked ({name}: {e.strerror or e}; its file system has "
                          f"no flock): it is used unlocked, so nothing stops a second run or sweep from writing "
                          f"into it at the same time. Do not start two commands on it.", RuntimeWarning,
                          stacklevel=2)
        return None
    return fd


@contextlib.contextmanager
def outputs_lock(workdir: str):
    """Hold an exclusive ``flock`` on ``workdir``'s ``trajectory_parts/`` (a run directory) or ``members/`` (a
    sweep directory) while the block draws and writes the directory's outputs (``events.json``, ``plots/``,
    ``summary.md``): a ``report`` of a run or sweep still computing, and the run's (or sweep's) own ``finalize``
    take it, so the one that starts second waits for the first and reads what it wrote.  Without it a report
    that read the unfinished trajectory and wrote after the run had finished left the finished directory with
    the summary and plots of fewer steps (``- steps: 20 of 40``).  The directory lock
    (:func:`lock_directory`) cannot serve: the run holds it all along.  Those subdirectories exist from the first
    chunk on and are never replaced, so every process locks the same inode; without one (nothing computed yet)
    or where the file system has no ``flock`` the block runs unlocked."""
    import fcntl

    path = next((os.path.join(workdir, d) for d in ("trajectory_parts", "members")
                 if os.path.isdir(os.path.join(workdir, d))), None)
    fd = None
    if path is not None:
        try:
            fd = os.open(path, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def unlock_directory(fd: int | None) -> None:
    """Release a lock of :func:`lock_directory`."""
    if fd is not None:
        os.close(fd)


def discard_new_run(workdir: str, created: bool) -> None:
    """Remove what a new run (or sweep) wrote into ``workdir`` before it failed: the directory itself when the
    failed call created it, else its entries (the directory was empty before the call: :func:`check_workdir`
    refuses any other that holds no run)."""
    if created:
        shutil.rmtree(workdir, ignore_errors=True)
        return
    for name in os.listdir(workdir):
        p = os.path.join(workdir, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.remove(p)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path``, atomically and durably (:func:`~quotient_sgd._durable.durable_write`)."""
    with durable_write(path) as f:
        json.dump(obj, f, indent=1, default=_json_default)


def write_config(path: str, settings: Settings) -> None:
    """Write ``settings`` to ``path`` (``config.json``) unless it holds them already: a new run, or a run resumed
    with other values of the keys a resume may change (``_IGNORED_KEYS``), which the file then records."""
    new = json.loads(json.dumps(settings.to_dict(), default=_json_default))
    if os.path.isfile(path):
        with open(path) as f:
            if json.load(f) == new:
                return
    write_json(path, new)


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# ---- metrics.jsonl ----------------------------------------------------------------------------------------------
def _clean(v):
    v = float(v)
    return v if math.isfinite(v) else str(v)


def _parse_row(line: str) -> dict | None:
    """The metric row a line of ``metrics.jsonl`` holds (its values as numbers: the non-finite ones are written as
    the strings ``"nan"``, ``"inf"``), or ``None`` when it holds none: not JSON (a torn line), or JSON that is no
    row quotient_sgd writes (not an object, no integer ``step``, a value that is no number)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    if isinstance(step, float) and step.is_integer():  # (a step written as 5.0: the row of step 5)
        row["step"] = step = int(step)
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    try:
        return {k: (float(v) if isinstance(v, str) else v) for k, v in row.items()}
    except ValueError:
        return None


def _scan_metrics(path: str, warn: bool, stacklevel: int = 3) -> list[tuple[str, dict]]:
    """``[(line, row)]`` of the rows of ``metrics.jsonl`` at ``path``, in file order.  Blank lines (whitespace
    only: a hand edit, an editor's trailing newline) are skipped; they held no row, and the rows after them are
    read.  A last line that is no row is the torn line of a run killed while appending its rows: left out (with a
    ``RuntimeWarning`` when ``warn``).  A line before the last that is no row (a hand edit; a kill leaves a torn
    line only at the end, and a resume drops it before appending) is left out with a ``RuntimeWarning`` naming it,
    and the rows after it are read: every valid row is kept."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.readlines()
    filled = [n for n, line in enumerate(lines) if line.strip()]
    out = []
    for n in filled:
        row = _parse_row(lines[n])
        if row is not None:
            out.append((lines[n], row))
            continue
        text = lines[n].strip()[:60]
        if n == filled[-1]:
            if warn:
                warnings.warn(f"{path}: line {n + 1} is not a complete JSON row ({text!r}: a run killed while "
                              f"appending its rows); ignoring it, {len(out)} row(s) read", RuntimeWarning,
                              stacklevel=stacklevel)
        else:
            warnings.warn(f"{path}: line {n + 1} is not a metric row ({text!r}: a JSON object with an integer "
                          f"'step' and numbers); ignoring it and keeping the rows after it", RuntimeWarning,
                          stacklevel=stacklevel)
    return out


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step (``{"step": k, "loss": ..., ...}``)."""

    def __init__(self, path: str):
        self.path = path

    def truncate(self, step: int) -> None:
        """Keep the rows with ``step < step``, atomically.  Blank lines and a torn last line are dropped, and
        the rows after a blank line are kept (:func:`_scan_metrics`: a blank line inside the file ended the rows
        kept, and a resumed run lost every row after it)."""
        if not os.path.exists(self.path):
            return
        keep = [line if line.endswith("\n") else line + "\n"
                for line, row in _scan_metrics(self.path, warn=False) if row["step"] < step]
        with durable_write(self.path) as f:
            f.writelines(keep)

    def steps(self) -> set[int]:
        """The steps of the rows the file holds."""
        return {row["step"] for _, row in _scan_metrics(self.path, warn=False)}

    def insert(self, rows: list[dict]) -> None:
        """Add ``rows`` (of steps the file lacks) among the rows it holds, in step order, atomically."""
        kept = [(row["step"], line if line.endswith("\n") else line + "\n")
                for line, row in _scan_metrics(self.path, warn=False)]
        new = [(int(r["step"]), json.dumps({k: (_clean(v) if k != "step" else int(v)) for k, v in r.items()}) + "\n")
               for r in rows]
        with durable_write(self.path) as f:
            f.writelines(line for _, line in sorted(kept + new, key=lambda t: t[0]))

    def append(self, rows: list[dict]) -> None:
        """Append ``rows``, ``fsync``-ed (and the directory, when this creates the file)."""
        new = not os.path.exists(self.path)
        with open(self.path, "a") as f:
            for r in rows:
                f.write(json.dumps({k: (_clean(v) if k != "step" else int(v)) for k, v in r.items()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_directory(os.path.dirname(os.path.abspath(self.path)))


def read_metrics(path: str) -> list[dict]:
    """The rows of ``metrics.jsonl``, as :meth:`MetricsLog.truncate` keeps them on resume: blank lines are
    skipped (the rows after them are read), a last line that is not JSON (the torn last line of a run killed while
    appending its rows) is left out with a ``RuntimeWarning`` naming the file, the line and how many rows were
    read, so a killed run can be reported; a line before the last that holds no row is left out with a
    ``RuntimeWarning`` too."""
    return [row for _, row in _scan_metrics(path, warn=True)]


# ---- trajectory parts ------------------------------------------------------------------------------------------
def _concatenate(chunks: list[dict]) -> dict[str, np.ndarray]:
    """Chunks of a trajectory (dicts of arrays over steps) joined along the step axis."""
    return {k: np.concatenate([c[k] for c in chunks], axis=0) for k in chunks[0]} if chunks else {}


#: A finished trajectory part, named by the step it starts at.
_PART_NAME = re.compile(r"part_(\d+)\.npz")
#: The suffix of a part being written (it is renamed to ``part_<a>.npz`` once complete and fsynced).
_TMP_SUFFIX = ".tmp.npz"


class TrajectoryParts:
    """Per-chunk ``npz`` files; :meth:`assemble` concatenates them into ``trajectory.npz``."""

    def __init__(self, workdir: str):
        self.dir = os.path.join(workdir, "trajectory_parts")

    def _starts(self) -> list[int]:
        """The start steps of the finished parts (``part_<a>.npz``; the temporary file of a write that a kill
        interrupted, ``part_<a>.npz.tmp.npz``, is not a part)."""
        if not os.path.isdir(self.dir):
            return []
        return sorted(int(m.group(1)) for m in map(_PART_NAME.fullmatch, os.listdir(self.dir)) if m)

    def truncate(self, step: int) -> None:
        """Remove the parts starting at or after ``step`` and the temporary files of interrupted writes."""
        if not os.path.isdir(self.dir):
            return
        for name in os.listdir(self.dir):
            m = _PART_NAME.fullmatch(name)
            if (m is None and name.endswith(_TMP_SUFFIX)) or (m is not None and int(m.group(1)) >= step):
                os.remove(os.path.join(self.dir, name))

    def write(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Write ``part_<start>.npz`` atomically and durably (:func:`~quotient_sgd._durable.durable_write`): a
        part present after a crash of the machine is complete."""
        if not os.path.isdir(self.dir):
            os.makedirs(self.dir, exist_ok=True)
            fsync_directory(os.path.dirname(self.dir))
        with durable_write(os.path.join(self.dir, f"part_{start:09d}.npz"), "wb", _TMP_SUFFIX) as f:
            np.savez(f, **arrays)

    def readable(self, start: int) -> bool:
        """Whether ``part_<start>.npz`` is there and loads: a complete zip archive whose members pass their CRC
        check and which holds ``step``.  A part renamed into place before its data reached the disk (a crash of
        the machine on a file system that does not honour ``fsync``), truncated or overwritten does not: a resume
        computes its chunk again instead of failing when it assembles ``trajectory.npz``."""
        import zipfile

        try:
            with zipfile.ZipFile(os.path.join(self.dir, f"part_{start:09d}.npz")) as z:
                return "step.npy" in z.namelist() and z.testzip() is None
        except (OSError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError):
            return False

    def part_holding(self, step: int) -> dict[str, np.ndarray] | None:
        """The part whose steps include ``step`` (``None`` when no part on disk holds it)."""
        starts = [a for a in self._starts() if a <= step]
        if not starts:
            return None
        try:
            part = _read_npz(os.path.join(self.dir, f"part_{starts[-1]:09d}.npz"))
        except Exception:  # noqa: BLE001  (a part that does not load holds nothing usable)
            return None
        return part if step in set(np.asarray(part.get("step", [])).tolist()) else None

    def load(self) -> dict[str, np.ndarray]:
        return _concatenate([_read_npz(os.path.join(self.dir, f"part_{a:09d}.npz")) for a in self._starts()])

    def assemble(self, path: str, chunks: list[dict] | None = None) -> dict[str, np.ndarray]:
        """Write ``trajectory.npz`` from the parts on disk, or from ``chunks`` (the same parts, still in memory:
        the caller guarantees they are all of them, in order)."""
        traj = _concatenate(chunks) if chunks else self.load()
        with durable_write(path, "wb", ".tmp.npz") as f:
            np.savez(f, **traj)
        return traj


def finished_trajectory(workdir: str, chunks: list[dict] | None = None) -> dict[str, np.ndarray]:
    """The trajectory a finished (or diverged) run ends with, written to ``trajectory.npz``: the file itself when
    it is there and loads (kept by :func:`remove_outputs` for a run that computed nothing more: a finished run run
    again), else assembled from the parts (``chunks``: the same parts still in memory, see
    :meth:`TrajectoryParts.assemble`)."""
    path = os.path.join(workdir, "trajectory.npz")
    if os.path.isfile(path):
        try:
            return _read_npz(path)
        except Exception as e:  # noqa: BLE001  (a file a crash of the machine left incomplete: any read error)
            warnings.warn(f"{path} does not load ({type(e).__name__}: {e}); assembling it again from the trajectory "
                          f"parts", RuntimeWarning, stacklevel=2)
    return TrajectoryParts(workdir).assemble(path, chunks)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of an ``npz`` file (the file is closed also when it does not load)."""
    with open(path, "rb") as f, np.load(f) as z:
        return {k: z[k] for k in z.files}


class LoadedTrajectory(dict):
    """The trajectory :func:`load_trajectory` read (``{key: array}``, leading axis = step), with ``source``:
    what was read (``"trajectory.npz"``, or which trajectory parts of an unfinished run)."""

    source: str = ""


def load_trajectory(run_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The trajectory of a run directory (a run, or a sweep's ``members/<i>``): ``{key: array}``, leading axis =
    step, ``step`` included.

    ``trajectory.npz`` when it exists (a finished or diverged run; one that does not load, as a crash of the
    machine may leave it where the file system does not honour ``fsync``, or in a directory written before these
    files were fsynced, is reported with a ``RuntimeWarning`` and the parts are read).  Otherwise (a run
    unfinished, or killed before assembling it) the trajectory parts, joined in step order: every
    ``trajectory_parts/part_<a>.npz`` (a part is written to a temporary file and renamed: a present part is
    complete; the temporary file of a write a kill interrupted, ``*.tmp.npz``, is not read).  Parts starting at or
    after the newest checkpoint (for a sweep member, the sweep's) are read too: they hold steps the run computed
    before it was killed (their rows are in ``metrics.jsonl``); a resume drops and recomputes them, with the same
    values.  A part that does not load, or that does not start where the previous one ended, ends the trajectory
    with a ``RuntimeWarning`` naming it.  An empty dict when there is neither (a run killed before its first
    chunk).

    The result is a ``dict`` whose ``source`` attribute says what was read (``"trajectory.npz"``, or the parts,
    their steps and how many of them lie after the newest checkpoint).

    Raises:
        FileNotFoundError: ``run_dir`` does not exist, is a file (its ``trajectory.npz``, say), is a sweep
            directory (the message names its members' run directories), or holds no run (no ``config.json`` and
            no trajectory).
    """
    run_dir = directory_path(run_dir, "load_trajectory", "run_dir")
    path = os.path.join(run_dir, "trajectory.npz")
    out = LoadedTrajectory()
    unreadable = ""
    if os.path.isfile(path):
        try:
            out.update(_read_npz(path))
            out.source = "trajectory.npz"
            return out
        except Exception as e:  # noqa: BLE001  (a file a crash of the machine left incomplete: any read error)
            out.clear()
            unreadable = f"trajectory.npz does not load ({type(e).__name__}: {e})"
            warnings.warn(f"load_trajectory: {path} does not load ({type(e).__name__}: {e}); reading the "
                          f"trajectory parts it was assembled from instead", RuntimeWarning, stacklevel=2)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        # (its trajectory.npz given for the directory was said "not to exist")
        raise FileNotFoundError(f"load_trajectory: run_dir={run_dir!r} is a file, not a run directory; pass the run "
                                f"directory (the one holding it is {os.path.dirname(os.path.abspath(run_dir))!r})")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"load_trajectory: run_dir={run_dir!r} does not exist")
    if os.path.isfile(os.path.join(run_dir, "sweep.json")):
        raise FileNotFoundError(f"load_trajectory: {run_dir!r} is a sweep directory, not a run; its members' run "
                                f"directories are {os.path.join(run_dir, 'members', '<index>')!r} (e.g. "
                                f"{os.path.join(run_dir, 'members', '000')!r}): pass one of them")
    parts = TrajectoryParts(run_dir)
    starts = parts._starts()
    if not starts:
        if not os.path.isfile(os.path.join(run_dir, "config.json")):
            raise FileNotFoundError(f"load_trajectory: {run_dir!r} is not a run directory (no config.json, no "
                                    f"trajectory.npz, no trajectory_parts/)")
        out.source = (f"nothing: {unreadable}, and no trajectory part to read instead" if unreadable else
                      "nothing: no trajectory.npz and no trajectory parts (a run stopped before its first chunk)")
        return out
    chunks, end = [], None
    for a in starts:
        name = os.path.join(parts.dir, f"part_{a:09d}.npz")
        try:
            chunk = _read_npz(name)
        except Exception as e:  # noqa: BLE001  (a file a crash of the machine left incomplete: any read error)
            warnings.warn(f"load_trajectory: {name} does not load ({type(e).__name__}: {e}); the trajectory "
                          f"ends before step {a}", RuntimeWarning, stacklevel=2)
            break
        first = int(chunk["step"][0]) if len(chunk.get("step", ())) else a
        if end is not None and first != end:
            warnings.warn(f"load_trajectory: {name} starts at step {first}, the parts before it end at step "
                          f"{end}; the trajectory ends there", RuntimeWarning, stacklevel=2)
            break
        chunks.append(chunk)
        end = first + len(next(iter(chunk.values()), ()))
    if not chunks:
        out.source = f"nothing: {unreadable or 'no trajectory.npz'}, and its first trajectory part does not load"
        return out
    out.update(_concatenate(chunks))
    # a sweep member's checkpoints are the sweep's (members/<i>/../../checkpoints): a resume restarts from them
    root = os.path.dirname(os.path.dirname(os.path.abspath(run_dir)))
    member = (os.path.basename(os.path.dirname(os.path.abspath(run_dir))) == "members"
              and os.path.isfile(os.path.join(root, "sweep.json")))
    ckpts = checkpoint_steps(root if member else run_dir)
    past = [a for a in starts[: len(chunks)] if a >= max(ckpts, default=0)]
    whose = "the sweep's newest checkpoint" if member else "the newest checkpoint"
    where = (f"{whose} (step {ckpts[-1]})" if ckpts else "step 0 (no checkpoint)")
    # a finished run (it wrote run.json) whose trajectory.npz is gone: not an unfinished one, and run again it
    # computes nothing (its summary said "an unfinished or killed run ... a resume recomputes them" beside "final")
    finished = os.path.isfile(os.path.join(run_dir, "run.json"))
    missing = ("no trajectory.npz, removed after the run finished (run.json)" if finished
               else "no trajectory.npz: an unfinished or killed run")
    out.source = (f"trajectory_parts/ ({len(chunks)} part(s), steps {starts[0]} to {end - 1}; "
                  + (unreadable or missing)
                  + (f"; {len(past)} part(s) from step {past[0]} on are after {where}: a resume recomputes them"
                     if past and not finished else "") + ")")
    return out


# ---- checkpoints (orbax) ---------------------------------------------------------------------------------------
class Checkpoints:
    """Orbax checkpoints of a training state by step, saved asynchronously: :meth:`save` returns once orbax holds
    the arrays and writes them while the next chunk runs (it waits for the previous save first; :meth:`close`
    waits for the last).  A step counts only once orbax has finalised it, and everything a run writes for the
    steps before a checkpoint (metrics rows, trajectory parts) is written before that checkpoint's save starts,
    so a kill at any moment resumes from a finalised step with nothing of its past missing.  Leaves are stored
    under their flat index; restoring needs a template tree of the same structure (a fresh init), so any
    optimiser-state structure round-trips exactly.  Arrays that span several processes (a multi-host sweep) are
    saved and restored as global ``jax.Array`` s by every process together (orbax writes each process's shards);
    the others go through host memory."""

    def __init__(self, workdir: str, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.keep = keep
        for step in _half_deleted_steps(self.dir):
            shutil.rmtree(os.path.join(self.dir, step), ignore_errors=True)
        self.manager = self._manager()

    def _manager(self):
        return self._ocp.CheckpointManager(
            self.dir, options=self._ocp.CheckpointManagerOptions(
                max_to_keep=self.keep, enable_async_checkpointing=True, create=True))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        leaves = {f"{i:05d}": _global_or_host(x) for i, x in enumerate(jax.tree.leaves(state))}
        with sigint_deferred():  # the save waits for the previous one's finalisation: let it finish
            self.manager.save(step, args=self._ocp.args.StandardSave(leaves))

    def restore(self, step: int, template):
        """The state saved at ``step``, in the structure of ``template``; leaves of ``template`` that are global
        arrays come back with their sharding, the others as numpy arrays."""
        leaves, treedef = jax.tree.flatten(template)
        abstract = {f"{i:05d}": _abstract(x) for i, x in enumerate(leaves)}
        got = self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
        return jax.tree.unflatten(treedef, [got[f"{i:05d}"] if _is_global(x) else np.asarray(got[f"{i:05d}"])
                                            for i, x in enumerate(leaves)])

    def restore_latest(self, template) -> tuple[int, Any]:
        """``(step, state)`` of the newest checkpoint that restores, or ``(0, None)`` when there is none
        (``template``: a tree, or ``step -> tree`` when the structure depends on the step).  A step that does not
        restore (a kill that interrupted orbax's finalisation) is reported and deleted, and the one before it is
        used: resuming from an older checkpoint recomputes more, it loses nothing."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return int(step), self.restore(step, template(step) if callable(template) else template)
            except Exception as e:  # noqa: BLE001  (any failure to read the step means: not a usable checkpoint)
                warnings.warn(f"checkpoint {step} in {self.dir} does not restore ({type(e).__name__}: {e}); "
                              f"deleting it and resuming from an earlier one", RuntimeWarning, stacklevel=2)
                self.manager.close()
                shutil.rmtree(os.path.join(self.dir, str(step)), ignore_errors=True)
                self.manager = self._manager()  # a fresh manager: the failed read leaves it inconsistent
        return 0, None

    def close(self) -> None:
        with sigint_deferred():
            self.manager.close()


#: Files orbax writes into every step directory it finalises (``<step>/_CHECKPOINT_METADATA``, the step's
#: metadata, and ``<step>/default/_METADATA``, the tree's).
_STEP_FILES = ("_CHECKPOINT_METADATA", os.path.join("default", "_METADATA"))


def _half_deleted_steps(directory: str) -> list[str]:
    """The step directories in ``directory`` that lack one of :data:`_STEP_FILES` and are older than a complete
    step: what remains of a step that orbax was deleting when the run was killed (after finalising a step it
    removes the older ones beyond ``keep``, file by file, in parallel; orbax would warn "Metadata file does not
    exist" on each, then delete it at the next save).  A step being written never looks like this (orbax
    finalises a step by renaming its temporary directory); an incomplete newest step is left to
    :meth:`Checkpoints.restore_latest`, which reports it."""
    if not os.path.isdir(directory):
        return []
    steps = [x for x in os.listdir(directory) if x.isdigit()]
    complete = [int(x) for x in steps if all(os.path.isfile(os.path.join(directory, x, f)) for f in _STEP_FILES)]
    newest = max(complete, default=-1)
    return sorted((x for x in steps if int(x) < newest and int(x) not in complete), key=int)


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the finalised checkpoints in ``workdir/checkpoints`` (orbax's temporary directories of a save
    in flight, and what remains of a step whose deletion a kill interrupted, are not steps), ascending."""
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    bad = set(_half_deleted_steps(d))
    return sorted(int(x) for x in os.listdir(d) if x.isdigit() and x not in bad)


#: The signals :func:`sigint_deferred` holds back: Ctrl-C, and the SIGTERM that batch schedulers, ``timeout`` and
#: container runtimes send before killing a process (a handler for it is Python's only where the caller installed
#: one: the ``quotient-sgd`` command does, for ``run`` and ``sweep``).
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def sigint_deferred():
    """Hold back Ctrl-C (SIGINT) and SIGTERM until the block ends, then deliver the first one received to the
    handler that was installed for it (Python's for SIGINT: ``KeyboardInterrupt``; the command's for SIGTERM).
    Checkpoint writes run to completion, so an interrupt never leaves a half-finalised checkpoint or orbax's error
    log behind.  A signal whose handler is not a Python callable (ignored, the default action, installed outside
    Python: SIGTERM in a program that installed none) is left alone, and so is everything outside the main thread;
    the handlers are restored when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {sig: h for sig in DEFERRED_SIGNALS if callable(h := signal.getsignal(sig))}
    received: list = []
    for sig in held:
        signal.signal(sig, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
        if received:
            signum, frame = received[0]
            held[signum](signum, frame)


def _is_global(x) -> bool:
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def _global_or_host(x):
    return x if _is_global(x) else np.asarray(x)


def _abstract(x):
    if _is_global(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return np.zeros(np.shape(x), np.dtype(x.dtype))


def remove_outputs(workdir: str, plots: bool = True, trajectory: bool = True) -> None:
    """Remove the derived outputs (they are rewritten at the end of a run).  ``events.json`` is one of them: the
    one that ``report`` wrote for an interrupted run holds the events of its shorter trajectory, and a later
    ``report`` re-detects them only when the file is missing.  ``plots=False`` keeps ``plots/``: the caller
    passes it when the run computes nothing more (its plots describe its whole trajectory) and will not write
    plots itself (``logging.plots=False``), so the plots of an earlier call are not lost.  ``trajectory=False``
    keeps ``trajectory.npz``: the caller passes it when the run computes nothing more, and then finishes with the
    file as it is (:func:`finished_trajectory`), not one assembled again from ``trajectory_parts/`` (which a user
    may have removed to reclaim the space: the finished run run again replaced its trajectory by an empty one)."""
    names = ("trajectory.npz",) if trajectory else ()
    for name in (*names, "events.json", "summary.md", "run.json"):
        p = os.path.join(workdir, name)
        if os.path.exists(p):
            os.remove(p)
    if plots:
        shutil.rmtree(os.path.join(workdir, "plots"), ignore_errors=True)
