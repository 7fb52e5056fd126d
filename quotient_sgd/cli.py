"""The ``quotient-sgd`` command: ``run``, ``sweep`` and ``report``.

    quotient-sgd run   [--config=configs/X.py] [--config.optim.lr=0.05 ...] [--workdir=runs/NAME]
    quotient-sgd sweep [--config=configs/X.py] [--config.sweep.lr="(0.03,0.1)"] [--workdir=runs/NAME-sweep]
                       [--coordinator_address=HOST:PORT --num_processes=N --process_id=I | --distributed]
    quotient-sgd report runs/NAME

Without ``--config`` the default config shipped in the package (``quotient_sgd/config/quickstart.py``) runs.

Allocator settings: glibc's malloc reads ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and
``MALLOC_TOP_PAD_`` only at process start, so the command re-executes itself once with
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=268435456`` (fewer
mmap/munmap round trips and page faults for the large host buffers of checkpoints and trajectories).  Values
already present in the environment are kept; ``QSGD_NO_MALLOC_TUNING=1`` disables the re-exec.

Compilation cache: ``run`` and ``sweep`` keep JAX's persistent compilation cache (:func:`compilation_cache_dir`),
so a command that compiles the programs of an earlier one (the same config with another seed or learning rate:
both are program inputs) loads them from disk instead of compiling again (``quotient-sgd run`` on the default
config: 4-5.2 s instead of 7-9 s, README's Measured status).  A cached program is the compiled program itself:
results are unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading

from ._interrupt import interrupt_in

MALLOC_SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "268435456",
}
_REEXEC_MARK = "QSGD_MALLOC_TUNED"
#: Set in the environment of the re-executed process when the re-exec blocked SIGINT (:func:`_maybe_reexec`).
_UNBLOCK_MARK = "QSGD_UNBLOCK_SIGINT"

USAGE = __doc__.split("\n\n")[1]

HELP = f"""quotient-sgd: config-driven training runs that record quotient (symmetry-corrected) trajectories.

{USAGE}

  --config=PATH            a configs/<name>.py with get_config() (default: the embedded quickstart config)
  --config.KEY=VALUE       override one key of the config, e.g. --config.optim.lr=0.05 --config.steps=2000
  --workdir=DIR            the run (or sweep) directory; re-running the same command resumes from its last
                           checkpoint; a directory holding a different config is refused
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
                           a sweep over several hosts (jax.distributed; env QSGD_COORDINATOR_ADDRESS,
                           QSGD_NUM_PROCESSES, QSGD_PROCESS_ID)
  --distributed            jax.distributed.initialize() with JAX's cluster auto-detection (TPU pods, SLURM)
  -h, --help               this text;  --version  the package version

The keys of a config, with their defaults: python -c "import quotient_sgd.config as c; print(c.default_config())"
(an override of a key the run would not read, e.g. model.channels of an MLP, is refused).
Exit status: 0 done; 2 a bad config, option or directory (reported before anything is computed or written);
130 interrupted: Ctrl-C waits for the checkpoint being written, and the same command resumes; 143 terminated:
SIGTERM (sent by SLURM, timeout, Kubernetes before a kill) during run or sweep does the same; 141: the reader
of the output went away (a pipe into head), quietly.
Environment: QSGD_NO_MALLOC_TUNING=1 keeps glibc's default malloc (see the module docstring of quotient_sgd.cli);
QSGD_COMPILATION_CACHE=DIR (or "off") moves (or turns off) the compilation cache, ~/.cache/quotient_sgd/jax by
default ($XDG_CACHE_HOME/quotient_sgd/jax); JAX_COMPILATION_CACHE_DIR, when set, is used as it is.
"""


def compilation_cache_dir() -> str | None:
    """The directory of JAX's persistent compilation cache for ``run`` and ``sweep``: ``$QSGD_COMPILATION_CACHE``
    (``off``, ``none``, ``0`` or empty: no cache), else ``$XDG_CACHE_HOME/quotient_sgd/jax`` (``XDG_CACHE_HOME``
    defaults to ``~/.cache``, also when it is not an absolute path, as the XDG base directory specification
    asks)."""
    path = os.environ.get("QSGD_COMPILATION_CACHE")
    if path is not None:
        return None if path.strip().lower() in ("", "off", "none", "0", "false") else os.path.expanduser(path)
    root = os.environ.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(root):  # (the XDG spec: a relative path is invalid and ignored; it put the cache in the
        root = os.path.join(os.path.expanduser("~"), ".cache")  # working directory of each command)
    return os.path.join(root, "quotient_sgd", "jax")


def _enable_compilation_cache() -> None:
    """Point JAX's persistent compilation cache at :func:`compilation_cache_dir` (a cache the user configured
    through ``JAX_COMPILATION_CACHE_DIR`` is kept; a directory that cannot be created means no cache)."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    path = compilation_cache_dir()
    if path is None:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    # the init and chunk programs of small models compile in 0.2-4 s: keep every one worth reading back (a threshold
    # of the user's own, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, is kept)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def _maybe_reexec(argv: list[str]) -> None:
    """Re-execute this process once with the allocator settings (see the module docstring).

    SIGINT is blocked across the ``execve`` (a blocked signal stays pending through it) and unblocked by the new
    process's :func:`main` once its handler is in place (:func:`_unblock_after_reexec`): a Ctrl-C while the new
    interpreter started, ran ``site`` or imported this module ended the command with Python's own exit (killed
    by SIGINT, status -2, or status 1 and a traceback) instead of status 130.  One that arrived before the block
    is raised here, before the ``execve``."""
    if os.environ.get("QSGD_NO_MALLOC_TUNING") == "1" or os.environ.get(_REEXEC_MARK) == "1":
        return
    if all(k in os.environ for k in MALLOC_SETTINGS):
        return
    env = dict(os.environ)
    for k, v in MALLOC_SETTINGS.items():
        env.setdefault(k, v)
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    mask = getattr(signal, "pthread_sigmask", None)
    # (pthread_sigmask runs the Python handlers of the signals that arrived before it returns: a Ctrl-C just
    # before the block raises here)
    before = mask(signal.SIG_BLOCK, {signal.SIGINT}) if mask is not None else None
    if before is not None and signal.SIGINT not in before:
        env[_UNBLOCK_MARK] = "1"
    # the new process imports this package from where this one did: `-m quotient_sgd.cli` put the working
    # directory first on sys.path, so a `quotient_sgd` package there (a checkout of another version, a folder of
    # that name) ran in place of the installed one that the `quotient-sgd` command had started
    boot = ("import sys\n"
            "if sys.path[:1] == ['']:\n    del sys.path[0]\n"
            + (f"sys.path.insert(0, {sys.path[0]!r})\n" if sys.path else "")
            + "from quotient_sgd.cli import main\nsys.exit(main())\n")
    try:
        os.execve(sys.executable, [sys.executable, "-c", boot, *argv[1:]], env)
    finally:  # (only when the execve failed)
        if before is not None:
            mask(signal.SIG_SETMASK, before)


def _unblock_after_reexec() -> None:
    """Unblock the SIGINT that :func:`_maybe_reexec` blocked before it re-executed this process (a Ctrl-C pending
    since then is delivered now, to the handler of :func:`main`)."""
    if os.environ.pop(_UNBLOCK_MARK, None) == "1" and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _define_flags(argv: list[str]):
    from absl import flags
    from ml_collections import config_flags

    from .config import quickstart_path

    # ml_collections loads the file as the module "config_config" with SourceFileLoader.load_module, which
    # re-executes it inside a module of that name already in sys.modules: a second main() in one process would
    # keep the first config's names (its get_config() for a file that defines none)
    sys.modules.pop("config_config", None)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", default=quickstart_path(), help_string="config file (get_config())",
                                    flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "run directory (default runs/<config name>, sweeps runs/<name>-sweep)",
                        flag_values=fv)
    flags.DEFINE_string("coordinator_address", os.environ.get("QSGD_COORDINATOR_ADDRESS"),
                        "multi-host sweep: coordinator HOST:PORT (env QSGD_COORDINATOR_ADDRESS)", flag_values=fv)
    flags.DEFINE_integer("num_processes", _env_int("QSGD_NUM_PROCESSES", "the number of processes, as --num_processes"),
                         "multi-host sweep: number of processes (env QSGD_NUM_PROCESSES)", flag_values=fv)
    flags.DEFINE_integer("process_id", _env_int("QSGD_PROCESS_ID", "this process's id, as --process_id"),
                         "multi-host sweep: this process's id (env QSGD_PROCESS_ID)", flag_values=fv)
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() with JAX's cluster auto-detection "
                      "(TPU pods, SLURM, ...)", flag_values=fv)
    return fv


class _EnvError(ValueError):
    """An environment variable the command reads has a value it cannot use."""


def _env_int(name: str, what: str):
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    try:
        return int(v)
    except ValueError:
        raise _EnvError(f"environment variable {name}={v!r}: expected an integer ({what})") from None


def _override_kind(key: str) -> type | None:
    """The type of the schema's dotted ``key`` (``bool``, ``int``, ...), ``None`` for a key the schema lacks."""
    from .config import Settings

    node = Settings()
    for part in key.split("."):
        node = getattr(node, part, None)
    return None if node is None else type(node)


def _expand_home(arg: str) -> str:
    """``--workdir=~/runs/x`` (or ``--config=~/x.py``) with the ``~`` expanded (``os.path.expanduser``): the shell
    expands a ``~`` only at the start of a word, so absl received it as it is, and the run went into a directory
    named ``~`` under the working directory (the config file "did not exist")."""
    m = re.match(r"^(-{1,2}(?:config|workdir)=)(~.*)$", arg)
    return m.group(1) + os.path.expanduser(m.group(2)) if m else arg


def _overrides(argv: list[str]) -> list[tuple[str, str]]:
    """``(dotted key, value as typed)`` of the ``--config.<key>=<value>`` (or ``--config.<key> <value>``)
    arguments, in every spelling ``ml_collections`` applies: one dash or two, and ``--noconfig.<key>`` (a bool set
    to ``False``); a bool key written alone (``--config.optim.nesterov``) is ``True`` and takes no value from the
    next argument."""
    out = []
    for i, a in enumerate(argv):
        m = re.match(r"-{1,2}(no)?config\.(.*)", a)
        if m is None:
            continue
        key, eq, value = m.group(2).partition("=")
        if m.group(1):
            value = "False"
        elif not eq:
            if _override_kind(key) is bool:
                value = "True"
            else:
                value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
        out.append((key, value))
    return out


def _repeated_tuple_override(argv: list[str]) -> str | None:
    """The message for a tuple key given more than once (``--config.model.hidden=(8,) --config.model.hidden=(4,)``),
    or ``None``.  ``ml_collections`` joins the values of a repeated tuple flag (the model got ``hidden = (8, 4)``,
    two layers, where a key given twice otherwise takes its last value): neither reading is safe to guess, so the
    command asks for the whole tuple once."""
    given: dict[str, list[str]] = {}
    for key, value in _overrides(argv):
        if _override_kind(key) is tuple:
            given.setdefault(key, []).append(value)
    for key, values in given.items():
        if len(values) > 1:
            return (f"config.{key} is given {len(values)} times ({', '.join(map(repr, values))}); ml_collections "
                    f"would join the values of a repeated tuple key into one tuple, not keep the last: give the whole "
                    f"tuple once: --config.{key}=\"{values[-1]}\" for the last value, or one tuple holding them all")
    return None


_KINDS = {"bool": "a bool (True/False)", "int": "an int", "float": "a float", "str": "a string",
          "tuple": "a tuple/list", "ConfigDict": "a section (ConfigDict)"}


def _config_file_type_error(exc: BaseException) -> str | None:
    """The message for a config file that assigned a value of the wrong type to a key of a type-safe
    ``ConfigDict`` (``config.optim.lr = "0.1"``): the full dotted key, the value, the expected type and the line
    of the config file.  ``None`` when ``exc`` is not that (``ml_collections`` reports only the last key)."""
    from ml_collections import ConfigDict

    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        frames, tb = [], e.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        setter = next((f for f in reversed(frames) if f.f_code.co_name == "__setitem__"
                       and isinstance(f.f_locals.get("self"), ConfigDict) and "key" in f.f_locals), None)
        if isinstance(e, TypeError) and setter is not None:
            node, key, value = setter.f_locals["self"], setter.f_locals["key"], setter.f_locals.get("value")
            path, where = None, ""
            for f in frames:
                if f.f_code.co_name == "get_config":
                    where = f" (in {f.f_code.co_filename}, line {f.f_lineno})"
                for v in list(f.f_locals.values()):
                    if path is None and isinstance(v, ConfigDict):
                        path = _path_to(v, node)
            dotted = ".".join([*(path or []), str(key)])
            field = node._fields.get(key) if hasattr(node, "_fields") else None
            kind = "ConfigDict" if isinstance(field, ConfigDict) else type(field).__name__  # (a subclass too)
            expected = _KINDS.get(kind, kind) if field is not None else "?"
            return (f"config.{dotted} = {value!r}{where}: expected {expected}, got {type(value).__name__}"
                    + ("" if path is not None else " (the key's section could not be determined)"))
        e = e.__context__ or e.__cause__
    return None


def _flag_value_error(exc: BaseException) -> str | None:
    """``config.KEY = 'VALUE': expected <type> (why)`` for a ``--config.KEY=VALUE`` that absl could not parse as
    the key's type (its own message for a bool was ``('Non-boolean argument to boolean flag', 'yes')``), ``None``
    for any other error."""
    import re

    from .config import Settings

    m = re.fullmatch(r"flag --config\.([\w.]+)=(.*?): (.*)", str(exc), re.S)
    if m is None:
        return None
    key, value, detail = m.groups()
    node = Settings()
    for part in key.split("."):
        node = getattr(node, part, None)
    kind = _KINDS.get(type(node).__name__)
    if node is None or kind is None:
        return None
    return f"config.{key} = {value!r}: expected {kind}" + ("" if isinstance(node, bool) else f" ({detail})")


def _config_key_hint(exc: BaseException) -> str:
    """For absl's "Unknown command line flag 'steps'" where the flag is a config key written without ``config.``
    (``--steps=3``, ``--lr=0.1``, ``--optim.lr=0.1``): the ``--config.KEY`` spelling of the keys it names (a
    top-level key, a dotted key, or the keys of the sections, ``sweep`` aside, with that name); else ``""``."""
    import dataclasses

    from .config import Settings
    from .config._settings import SECTIONS

    m = re.fullmatch(r"Unknown command line flag '(?:no)?([\w.]+)'.*", str(exc), re.S)
    if m is None:
        return ""
    name = m.group(1)
    top = {f.name for f in dataclasses.fields(Settings)}
    if name in top:
        keys = [name]
    elif name.count(".") == 1 and name.split(".")[0] in SECTIONS and name.split(".")[1] in {
            f.name for f in dataclasses.fields(SECTIONS[name.split(".")[0]])}:
        keys = [name]
    else:
        keys = [f"{sect}.{name}" for sect, cls in SECTIONS.items() if sect != "sweep"
                and name in {f.name for f in dataclasses.fields(cls)}]
    if not keys:
        return ""
    return (f"; config keys are set as --config.KEY=VALUE: did you mean "
            f"{' or '.join(f'--config.{k}' for k in keys)}?")


def _path_to(root, node, prefix=()):
    """The keys leading from the ``ConfigDict`` ``root`` to ``node`` (identity), or ``None``."""
    if root is node:
        return list(prefix)
    for k, v in root.items():
        if hasattr(v, "items") and not isinstance(v, (str, bytes)):
            found = _path_to(v, node, prefix + (k,))
            if found is not None:
                return found
    return None


def _config_first(argv: list[str]) -> list[str]:
    """``argv`` with the ``--config=PATH`` (or ``--config PATH``) argument moved right after the program name.
    ``ml_collections`` applies the ``--config.<key>`` overrides to the file given by ``--config`` and refuses an
    override written before it ("Found --config.steps=20 in argv before a value for --config was specified"); the
    order of the options means nothing to the command, so the file goes first and the overrides keep their order
    (the last of a key given twice wins)."""
    for i, a in enumerate(argv[1:], start=1):
        if re.match(r"^-{1,2}config(=|$)", a):
            n = 2 if "=" not in a and i + 1 < len(argv) else 1
            return [argv[0], *argv[i:i + n], *argv[1:i], *argv[i + n:]]
    return list(argv)


def _config_path(argv: list[str]) -> str | None:
    """The ``--config=PATH`` (or ``--config PATH``; one dash or two, as absl reads them) argument, ``None`` when
    absent (the embedded default)."""
    for i, a in enumerate(argv):
        m = re.match(r"-{1,2}config(=|$)", a)
        if m and m.group(1):
            return a[m.end():]
        if m and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _config_file_error(argv: list[str]) -> str | None:
    """The validation error of the config file alone, without the overrides; ``None`` when it is valid or cannot
    be loaded on its own."""
    from .config import ConfigError, load_config, validate

    path = _config_path(argv)
    if path is None:
        return None
    try:
        validate(load_config(path))
    except ConfigError as e:
        where = ", before any --config.* override" if _overrides(argv) else ""
        return f"{e} (in {path}{where})"
    except Exception:  # noqa: BLE001 - any other failure is reported by the caller as it is
        return None
    return None


def _config_load_error(argv: list[str]) -> str | None:
    """What stops the ``--config`` file from loading, said plainly, or ``None`` (no ``--config``, or it loads and
    its ``get_config()`` returns a mapping): a missing path, a directory, an exception raised by the file or its
    ``get_config()`` (type, message and the line of the config file), a ``get_config()`` that needs arguments or
    returns something other than a ``ConfigDict``.  ``ml_collections`` would report these with its own traceback
    text, or not at all (an exception in ``get_config()`` escaped as a traceback).  A file without
    ``get_config()`` is left to the caller's message."""
    import inspect
    import traceback

    from .config import ConfigError, load_config
    from .config._validate import config_module

    path = _config_path(argv)
    if path is None:
        return None
    if not path.strip():
        return "--config is empty; give a config file (configs/<name>.py), or leave the flag out for the default"
    if path.startswith("--"):
        return f"--config needs a file path, got the option {path!r}; write --config=configs/<name>.py"
    if not os.path.exists(path):
        head, colon, arg = path.rpartition(":")
        if colon and os.path.isfile(head):  # (it said the file did not exist)
            return (f"--config={path}: the file {head!r} exists, and the ':{arg}' after it (ml_collections' "
                    f"FILE:ARGUMENT form, get_config({arg!r})) is not read: the command calls get_config() with no "
                    f"argument; write --config={head} and change its keys with --config.KEY=VALUE (or give a file "
                    f"whose get_config() takes no argument)")
        return f"config file {path!r} does not exist"
    if os.path.isdir(path):
        return f"config file {path!r} is a directory; give a file defining get_config(), e.g. configs/tiny.py"
    try:
        cfg = load_config(path)
    except ConfigError as e:  # (load_config names a get_config() that needs arguments; the rest is the caller's)
        return str(e) if str(e).startswith("cannot load the config file") else None
    except SystemExit as e:
        # (sys.exit() in the file or its get_config(), or an argparse parser there reading the command's own
        # arguments, ended the command: with status 0 and nothing done for sys.exit(0), without naming the file)
        real = os.path.realpath(path)
        lines = [fr.lineno for fr in traceback.extract_tb(e.__traceback__) if os.path.realpath(fr.filename) == real]
        where = f", line {lines[-1]}" if lines else ""
        return (f"cannot load the config file {path!r}{where}: it ended the program (SystemExit({e.code!r})) "
                f"instead of returning a config; get_config() returns the config, and the command's own arguments "
                f"(--config.KEY=VALUE) change its keys")
    except Exception as e:  # noqa: BLE001 - anything the file raises is reported, with where it was raised
        typed = _config_file_type_error(e)
        if typed:  # a value of the wrong type assigned to a key: named with its dotted key
            return typed
        recorded = _json_record(path)
        if recorded:  # (a run's config.json given to --config: "line 44: NameError: name 'false' is not defined")
            return recorded
        real = os.path.realpath(path)
        lines = [fr.lineno for fr in traceback.extract_tb(e.__traceback__) if os.path.realpath(fr.filename) == real]
        if isinstance(e, SyntaxError) and e.lineno is not None:
            lines.append(e.lineno)
        where = f", line {lines[-1]}" if lines else ""
        text = e.msg if isinstance(e, SyntaxError) else str(e)
        if isinstance(e, TypeError) and "get_config()" in text:
            try:
                sig = f"get_config{inspect.signature(config_module(path).get_config)}"
            except Exception:  # noqa: BLE001
                sig = "get_config(...)"
            return (f"cannot load the config file {path!r}: {sig} cannot be called without arguments ({text}); "
                    f"the command calls get_config()")
        return f"cannot load the config file {path!r}{where}: {type(e).__name__}: {text}"
    if not (hasattr(cfg, "to_dict") or isinstance(cfg, dict)):
        return (f"cannot load the config file {path!r}: get_config() returned {cfg!r} ({type(cfg).__name__}), "
                f"not a ConfigDict; return the config (start from quotient_sgd.config.default_config())")
    from ml_collections import FrozenConfigDict

    if isinstance(cfg, FrozenConfigDict):  # (ml_collections: "FrozenConfigDict is immutable. Cannot call lock()")
        return (f"cannot load the config file {path!r}: get_config() returned a FrozenConfigDict, and the command "
                f"locks the config and applies the --config.KEY=VALUE overrides to it, which a frozen config "
                f"refuses; return a ConfigDict (ml_collections.ConfigDict(frozen) thaws it)")
    return None


def _override_missing_in_file(argv: list[str]) -> str | None:
    """The message for the first ``--config.<key>`` override whose key the loaded config lacks although the schema
    has it (a config file that replaced a section by a dict of its own: ``ml_collections`` raised a bare
    ``KeyError('momentum')``), else ``None``."""
    from .config import load_config, quickstart_path
    from .config._validate import missing_key_text

    try:
        cfg = load_config(_config_path(argv) or quickstart_path())
    except Exception:  # noqa: BLE001  (a file that does not load is named by the caller)
        return None
    for key, _ in _overrides(argv):
        parts = key.split(".")
        if hasattr(cfg, "keys") and parts[0] not in cfg:
            return missing_key_text(parts[0], cfg)
        node = cfg
        for part in parts[:-1]:
            node = node[part] if hasattr(node, "keys") and part in node else None
        if hasattr(node, "keys") and parts[-1] not in node:
            return missing_key_text(key, node)
    return None


def _json_record(path: str) -> str | None:
    """The message for a ``--config`` file that is a JSON object (a run directory's ``config.json``, a sweep's
    ``sweep.json``) rather than a Python config file, or ``None`` when it is not JSON."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    return (f"config file {path!r} holds JSON (a run directory's config.json, or a sweep's sweep.json?), not a "
            f"Python config file: --config takes a file defining get_config() (e.g. configs/tiny.py) and changes "
            f"its keys with --config.KEY=VALUE; a recorded config is read back by quotient_sgd.config.from_dict "
            f"(and redrawn by `quotient-sgd report DIR`)")


def _bad_json(workdir: str) -> str | None:
    """The first of the JSON records of a run or sweep directory that does not parse, with the parser's message;
    for a sweep, its members' records too (``members/<i>/``: a member's torn ``events.json`` escaped ``report`` and
    ``sweep`` as a bare ``JSONDecodeError`` traceback)."""
    names = ("sweep.json", "config.json", "run.json", "events.json", "diverged.json")
    dirs = [workdir]
    members = os.path.join(workdir, "members")
    if os.path.isfile(os.path.join(workdir, "sweep.json")) and os.path.isdir(members):
        dirs += [os.path.join(members, m) for m in sorted(os.listdir(members))]
    for d in dirs:
        for name in names:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                try:
                    with open(path) as f:
                        json.load(f)
                except ValueError as e:
                    return f"{path} is not valid JSON ({e})"
    return None


def _unused_override_error(argv: list[str], settings, cmd: str) -> str | None:
    """The first ``--config.<key>`` override that ``cmd`` would not read with ``settings`` (a key of another
    model, data set or optimiser, ...: :func:`quotient_sgd.config.unused_keys`), named with why, or ``None``.
    An override that resets such a key to the schema's default passes (``optim.momentum=0`` with Adam, as
    validation asks; an emptied sweep axis on ``run``)."""
    from .config import Settings, unused_keys

    unused = unused_keys(settings, cmd)
    default = Settings()
    for key, value in dict(_overrides(argv)).items():  # (a key given twice: the last value is the one in effect)
        if key not in unused:
            continue
        now, dflt = settings, default
        for part in key.split("."):  # (a top-level key such as `seed` too)
            now, dflt = getattr(now, part), getattr(dflt, part)
        if now == dflt:
            continue  # a reset to the default (momentum=0 for Adam, an emptied sweep axis on `run`) asks for nothing
        if _validation_needs(argv, settings, key):
            continue  # (the file's value of the key does not validate: the override is how the config becomes valid)
        return f"config.{key} = {value}: this override would have no effect: {unused[key]}"
    return None


def _validation_needs(argv: list[str], settings, key: str) -> bool:
    """Whether the config does not validate with the config file's own value of ``key`` in place of the
    override's (the other overrides kept): validation checks every key whatever the command, so a key the command
    does not read can still have to change (``data.batch_size`` above a training set that ``--config.data.n_train``
    shrank, on a sweep whose ``sweep.batch_size`` replaces it), and refusing its override as without effect left no
    command line that runs."""
    from .config import ConfigError, load_config, quickstart_path, validate

    try:
        node = load_config(_config_path(argv) or quickstart_path())
        for part in key.split("."):
            node = node[part]
        validate(settings.replace(**{key: node}).to_dict())
    except ConfigError:
        return True
    except Exception:  # noqa: BLE001  (the file loaded and validated before: nothing else to tell)
        return False
    return False


#: What a bool value written as a separate argument looks like (absl reads 1/0 given to a bool as True/False).
_BOOL_WORDS = ("true", "false", "1", "0")


def _fail(msg: str, code: int = 2) -> int:
    print(f"quotient-sgd: error: {msg}", file=sys.stderr)
    return code


def _echo(text: str) -> None:
    """Print ``text`` on stdout, a character its encoding lacks as a backslash escape (the summary of a run named
    ``网络`` under an ASCII locale, ``LC_ALL=C`` with ``PYTHONUTF8=0``, ended ``report`` in a
    ``UnicodeEncodeError`` traceback after it had written the summary)."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default ``sys.argv``); returns its exit status (see ``--help``)."""
    argv = list(sys.argv if argv is None else argv)
    try:
        with _sigterm_raises((signal.SIGINT,)):  # (a Ctrl-C in a gc callback while importing is delivered too)
            try:
                _unblock_after_reexec()
                return _main(argv)
            except Exception as e:  # an interrupt an extension module re-raised as another exception
                interrupt = interrupt_in(e)
                if interrupt is None:
                    raise
                raise interrupt from None
    except KeyboardInterrupt:  # Ctrl-C before run or sweep started (importing, validating) or during report
        if "report" in argv[1:]:
            return _fail("interrupted; run the same report command again to redraw the plots and summary.md",
                         code=130)
        return _fail("interrupted before anything was written", code=130)
    except BrokenPipeError:  # the reader of stdout went away (`quotient-sgd report DIR | head`): no traceback
        try:  # (what is still buffered for stdout would raise again when the interpreter flushes it at exit)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 128 + signal.SIGPIPE


def _main(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(HELP)
        return 0
    if "--version" in argv[1:]:
        from . import __version__

        print(f"quotient-sgd {__version__}")
        return 0
    if argv is sys.argv or argv == sys.argv:
        _maybe_reexec(argv)
    argv = [_expand_home(a) for a in argv]
    from absl import flags

    from .config import ConfigError, check_override_key

    try:
        for key, value in _overrides(argv[1:]):
            check_override_key(key, value)
    except ConfigError as e:
        return _fail(str(e))
    repeated = _repeated_tuple_override(argv[1:])
    if repeated:
        return _fail(repeated)
    load_error = _config_load_error(argv[1:])
    if load_error:
        return _fail(load_error)
    for name in ("config", "workdir", "coordinator_address", "num_processes", "process_id"):
        # absl keeps the last of a flag given twice, silently (for --config, the checks of the file read the first)
        given = [a.partition("=")[2] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
                 for i, a in enumerate(argv) if i and re.match(rf"^-{{1,2}}{name}(=|$)", a)]
        if len(given) > 1:
            return _fail(f"--{name} is given {len(given)} times ({', '.join(map(repr, given))}); "
                         + ("give one config file, and change its keys with --config.KEY=VALUE" if name == "config"
                            else "give it once"))
    if len(argv) > 1 and re.fullmatch(r"-{1,2}config", argv[-1]):  # (ml_collections: "an earlier failure to load")
        return _fail("--config needs a file path, and none follows it; write --config=configs/<name>.py, or leave "
                     "the flag out for the default")
    for i, a in enumerate(argv[1:-1], start=1):
        # absl takes the next argument as the value: `--workdir --config.steps=3` wrote into a directory named
        # "--config.steps=3" and dropped the override, `--config.name --workdir=out` named the run "--workdir=out"
        if re.fullmatch(r"-{1,2}workdir", a) and argv[i + 1].startswith("-"):
            return _fail(f"--workdir needs a directory, got the option {argv[i + 1]!r}; write --workdir=DIR")
        key = re.fullmatch(r"-{1,2}config\.([\w.]+)", a)
        if key and argv[i + 1].startswith("--") and _override_kind(key.group(1)) not in (bool, None):
            return _fail(f"--config.{key.group(1)} needs a value, got the option {argv[i + 1]!r}; write "
                         f"--config.{key.group(1)}=VALUE")
        if key and _override_kind(key.group(1)) is bool and argv[i + 1].strip().lower() in _BOOL_WORDS:
            # absl's bool flag takes no separate value: the key became True and the value an argument of its own
            # ("unexpected arguments ['False']", or "unknown subcommand 'False'" before the subcommand)
            return _fail(f"config.{key.group(1)} = {argv[i + 1]!r}: a bool (True/False) key takes its value after "
                         f"'=': write --config.{key.group(1)}={argv[i + 1].strip().lower() in ('true', '1')} (--config."
                         f"{key.group(1)} alone means True)")
    argv = _config_first(argv)
    if _config_path(argv[1:]):  # (ml_collections imports the file again: the modules beside it stay importable)
        from .config._validate import config_dir_on_path

        config_dir_on_path(_config_path(argv[1:]))
    from .config._configdict import refuse_bool_numbers

    try:
        fv = _define_flags(argv)
        with refuse_bool_numbers():  # (ml_collections runs the config file here)
            rest = fv(argv)
    except _EnvError as e:
        return _fail(str(e))
    except flags.Error as e:
        # (a file setting a key to None: ml_collections refuses an override of it, "Type NoneType ... is not
        # supported for overriding"; the file's own error says which key holds what)
        return _fail(_config_file_type_error(e) or _flag_value_error(e) or _config_file_error(argv[1:])
                     or str(e) + _config_key_hint(e))
    except (AttributeError, KeyError, ValueError, TypeError, OSError) as e:
        # ml_collections raises these for an override of a key the config does not have / of the wrong type
        msg = str(e.args[0] if e.args else e).strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
        overrides = [a for a in argv[1:] if re.match(r"-{1,2}(no)?config\.", a)]
        if isinstance(e, OSError):
            return _fail(f"cannot load the config file: {msg}")
        file_error = _config_file_error(argv[1:])
        if file_error:  # the file itself is not a valid run config: say that, not which override tripped on it
            return _fail(file_error)
        if not overrides:
            return _fail(f"cannot load the config file {_config_path(argv[1:])!r}: {msg}")
        return _fail(_override_missing_in_file(argv[1:]) or f"bad config override among {overrides}: {msg}")
    if len(rest) < 2:
        # (`quotient-sgd` alone trained the default config into runs/quickstart of the current directory, and
        # `quotient-sgd --config=X.py` ran it: a command typed to see the usage started 600 steps of training)
        given = " with " + " ".join(argv[1:]) if len(argv) > 1 else ""
        return _fail(f"no subcommand{given}; say what to do: run, sweep or report (quotient-sgd --help lists the "
                     f"options)\n{USAGE}")
    cmd = rest[1]
    if cmd == "help":
        print(HELP)
        return 0
    if cmd == "report":
        given = [f"--{n}" for n in ("config", "workdir", *_LAUNCH_FLAGS) if fv[n].present]
        given += [f"--config.{k}" for k, _ in _overrides(argv[1:])]
        if given:  # report reads the directory's config.json: these would be ignored
            where = f" (the directory is the argument: quotient-sgd report {fv.workdir})" if fv.workdir else ""
            return _fail(f"{', '.join(given)}: `report` takes only the run or sweep directory; it redraws from the "
                         f"directory's own config.json, and these options are for run and sweep{where}")
        if len(rest) != 3:
            return _fail("usage: quotient-sgd report RUN_DIR")
        from .runner import RunDirError, report

        try:
            text = report(rest[2])
        except (FileNotFoundError, RunDirError) as e:  # (RunDirError: a record that is no record of a run or sweep)
            return _fail(str(e))
        except ConfigError as e:  # a config.json this version's schema does not accept (an older version's)
            record = ("sweep.json's config" if os.path.isfile(os.path.join(rest[2], "sweep.json"))
                      else "config.json")
            return _fail(f"cannot report {rest[2]!r}: its {record} is not a valid config: {e}")
        except json.JSONDecodeError:
            bad = _bad_json(rest[2])
            if bad is None:
                raise
            return _fail(f"cannot report {rest[2]!r}: {bad}")
        except OSError as e:  # (a directory it may read but not write: another user's runs, a read-only mount)
            where = f" ({e.filename})" if e.filename else ""
            return _fail(f"cannot report {rest[2]!r}: {e.strerror or e}{where}; report writes summary.md, "
                         f"events.json and plots/ into the directory: copy it somewhere writable and report the copy")
        _echo(text)
        return 0
    if cmd not in ("run", "sweep"):
        return _fail(f"unknown subcommand {cmd!r}; use run, sweep or report\n{USAGE}")
    if len(rest) > 2:
        return _fail(f"unexpected arguments {rest[2:]}")
    from .config import validate
    from .runner import RunDirError

    try:
        with refuse_bool_numbers():
            cfg = fv.config
        settings = validate(cfg)
    except OSError as e:
        return _fail(f"cannot load the config file: {e}")
    except (ConfigError, flags.Error, ValueError, KeyError, AttributeError, TypeError) as e:
        return _fail(str(e.args[0] if isinstance(e, KeyError) and e.args else e))
    unused = _unused_override_error(argv[1:], settings, cmd)
    if unused:
        return _fail(unused)
    bad_launch = _launch_error(fv, cmd)
    if bad_launch:
        return _fail(bad_launch)
    if fv.workdir is not None and not fv.workdir.strip():
        # e.g. --workdir=$RUNDIR with RUNDIR unset: writing to the default instead would surprise
        return _fail("--workdir is empty; give a directory, or leave the flag out for the default "
                     f"runs/{settings.name if cmd == 'run' else settings.name + '-sweep'}")
    workdir = fv.workdir or os.path.join("runs", settings.name if cmd == "run" else f"{settings.name}-sweep")
    _enable_compilation_cache()
    try:
        with _sigterm_raises():
            if cmd == "run":
                from .runner import run

                res = run(settings, workdir)
                status = (f"diverged at step {res.diverged['step']} ({res.diverged['reason']})" if res.diverged
                          else f"{res.steps_done} step{'s' if res.steps_done != 1 else ''}")
                print(f"quotient-sgd: {status}; wrote {workdir} ({res.wall_s:.1f} s)")
                return 0
            from .runner import sweep

            bad_start = _init_distributed(fv)
            if bad_start:
                return _fail(bad_start)
            out = sweep(settings, workdir)
            noun = "member" if out.num_members == 1 else "members"
            did = "wrote" if out.wrote else "finished before, kept as it was:"
            print(f"quotient-sgd: sweep of {out.num_members} {noun}; {did} {workdir} ({out.wall_s:.1f} s)")
            return 0
    except (ConfigError, RunDirError) as e:
        return _fail(str(e))
    except json.JSONDecodeError:
        bad = _bad_json(workdir)
        if bad is None:
            raise
        return _fail(f"{'run' if cmd == 'run' else 'sweep'} directory {workdir!r}: {bad}; refusing to write into it. "
                     f"Choose another --workdir")
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (_Terminated)
        return _report_interrupt(e, workdir, settings)
    except Exception as e:  # e.g. ImportError("initialization failed") of a matplotlib module Ctrl-C interrupted
        interrupt = interrupt_in(e)
        if interrupt is None:
            raise
        return _report_interrupt(interrupt, workdir, settings)


def _report_interrupt(interrupt: KeyboardInterrupt, workdir: str, settings) -> int:
    """Exit status and message of a run or sweep ended by ``interrupt``: 143 for SIGTERM (:class:`_Terminated`),
    130 for Ctrl-C, naming what the same command resumes from (:func:`_interrupted`)."""
    checkpoints, every = settings.checkpoint.enabled, settings.checkpoint.every
    if isinstance(interrupt, _Terminated):
        return _fail(_interrupted(workdir, "terminated (SIGTERM)", checkpoints=checkpoints, every=every),
                     code=128 + signal.SIGTERM)
    return _fail(_interrupted(workdir, checkpoints=checkpoints, every=every), code=130)


class _Terminated(KeyboardInterrupt):
    """SIGTERM received during ``run`` or ``sweep`` (:func:`_sigterm_raises`).  A ``KeyboardInterrupt``, so that
    it ends the run as Ctrl-C does: checkpoint writes in flight finish (the runner holds both signals back around
    them), the directory resumes as after Ctrl-C."""


@contextlib.contextmanager
def _sigterm_raises(signals: tuple = (signal.SIGTERM, signal.SIGINT)):
    """While the block runs, for the ``signals`` given: SIGTERM (what SLURM, ``timeout`` and Kubernetes send before
    a kill) raises :class:`_Terminated` in the main thread instead of ending the process at once, and Ctrl-C
    (SIGINT) raises ``KeyboardInterrupt`` as Python's handler does; the previous handlers are restored when the
    block ends.

    A signal that arrives while a garbage-collector callback, a weakref callback or a ``__del__`` runs raises
    there, where Python drops the exception ("Exception ignored in ...": ``sys.unraisablehook``) and the
    interrupted run went on to the end; the block's ``sys.unraisablehook`` delivers such a dropped interrupt again
    10 ms later (other unraisable exceptions go to the previous hook), and one still due when the block ends is
    raised as the block ends (after the previous hook and handlers are restored), not sent to the code after the
    block.  A signal that arrives where raising could end the process otherwise (:func:`_unsafe_to_raise`: while
    an extension module initialises, or code built from a string runs) is delivered again in the same way, 10 ms
    later, until it arrives elsewhere: a Ctrl-C ~0.3-0.7 s into ``quotient-sgd run`` ended it with status -6, -11
    (jaxlib's modules initialising) or -2 (a ``namedtuple`` or dataclass being built) instead of 130.  Nothing is
    changed outside the main thread, nor for a signal that is ignored (``SIG_IGN``: SIGINT in a job started in the
    background) or whose handler was installed outside Python, nor for SIGINT when a handler other than Python's
    own is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in signals}
    replace = [sig for sig, h in previous.items()
               if (h is signal.default_int_handler if sig == signal.SIGINT else h not in (None, signal.SIG_IGN))]

    def interrupted(signum, frame):
        if _unsafe_to_raise(frame, outside):
            return again(signum, 0.01)
        raise _Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    outside, f = [], sys._getframe()
    while f is not None:  # (the frames this block runs from: `python -c` runs them from code built from a string)
        outside.append(f)
        f = f.f_back
    outside = tuple(outside)
    previous_hook = sys.unraisablehook
    lock = threading.Lock()
    due: list[int] = []  # the signals of dropped (or deferred) interrupts not delivered again yet
    block_open = [True]

    def deliver(signum):
        with lock:  # (the block's end takes what is still due under the same lock)
            if block_open[0]:
                due.remove(signum)
                os.kill(os.getpid(), signum)

    def again(signum, delay):
        """Deliver ``signum`` again ``delay`` seconds from now (once: a second Ctrl-C meanwhile adds nothing)."""
        with lock:
            if signum in due:
                return
            due.append(signum)
        later = threading.Timer(delay, deliver, (signum,))
        later.daemon = True
        later.start()

    def dropped(unraisable):
        exc = unraisable.exc_value
        if not isinstance(exc, KeyboardInterrupt) or not replace:
            return previous_hook(unraisable)
        again(signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT, 0.01)

    for sig in replace:
        signal.signal(sig, interrupted)
    sys.unraisablehook = dropped
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        with lock:
            block_open[0] = False
            still_due = list(due)
        for sig in replace:
            signal.signal(sig, previous[sig])
    if still_due:  # (only when the block ended without an exception: one in flight goes on instead)
        raise _Terminated if signal.SIGTERM in still_due else KeyboardInterrupt


def _unsafe_to_raise(frame, outside: tuple = ()) -> bool:
    """Whether an exception raised at ``frame`` (the main thread's, given to a signal handler) could end the process
    in another way than the command's own: ``frame`` runs inside (the frames ``outside``, and those below them, are
    not looked at: the frames the handler was installed from)

    - the initialisation of an extension module (a frame of ``importlib``'s ``create_module`` or ``exec_module``
      of an ``ExtensionFileLoader`` below it): Python code that the module's C or C++ init calls raising there may
      end the process (nanobind: ``std::terminate``, status -6, or a segmentation fault, -11);
    - code that ``exec`` or ``eval`` runs from a string (a frame of file ``<string>`` below it: dataclasses,
      ``namedtuple`` and ``typing`` build code so while modules are imported): CPython 3.11 then records a
      ``KeyboardInterrupt`` as unhandled even when it is caught, and ``python -m quotient_sgd.cli`` (which the
      command re-executed itself as) ended with status -2, killed by SIGINT, after printing the command's own
      message and returning 130."""
    import importlib.machinery

    while frame is not None and not any(frame is f for f in outside):
        code = frame.f_code
        if code.co_filename == "<string>":
            return True
        if (code.co_name in ("create_module", "exec_module") and "importlib" in code.co_filename
                and isinstance(frame.f_locals.get("self"), importlib.machinery.ExtensionFileLoader)):
            return True
        frame = frame.f_back
    return False


def _last_row_step(path: str) -> int | None:
    """The step of the last complete row of the ``metrics.jsonl`` at ``path`` (its tail is read), ``None``
    when it has none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            tail = f.read()
    except OSError:
        return None
    for line in reversed(tail.split(b"\n")):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def _interrupted(workdir: str, what: str = "interrupted", *, checkpoints: bool = True,
                 every: int | None = None) -> str:
    """What an interrupted run or sweep kept (the runner has waited for the checkpoint being written), exactly:
    the checkpoint the same command resumes from, and the metric rows written after it (the rows of a chunk are
    written before its checkpoint, and a sweep writes a chunk's rows while the next one computes) that the resume
    drops and computes again.  ``checkpoints``: the command's ``checkpoint.enabled``; without checkpoints the same
    command starts again from step 0, whatever checkpoints an earlier command left in the directory.  ``every``:
    the command's ``checkpoint.every``; given, the step a command with checkpoints on resumes from is the newest
    of those checkpoints that the trajectory parts reach (:func:`~quotient_sgd.runner._run.rewind_to_parts`: the
    command without checkpoints dropped the parts from step 0 on)."""
    from .runner._rundir import checkpoint_steps

    steps = checkpoint_steps(workdir)
    if not checkpoints and os.path.isdir(workdir):
        resumes = f"its checkpoint of step {steps[-1]}" if steps else ""
        if steps and every is not None:
            from .runner._run import first_missing_part, resume_point

            members = os.path.join(workdir, "members")
            dirs = ([os.path.join(members, m) for m in sorted(os.listdir(members))
                     if os.path.isdir(os.path.join(members, m))] if os.path.isdir(members) else [workdir])
            missing = [a for a in (first_missing_part(d, steps[-1], every) for d in dirs) if a is not None]
            if missing:
                base = resume_point(steps, min(missing))
                resumes = f"its checkpoint of step {base}" if base else "step 0"
        older = f" (a command with checkpoint.enabled=True resumes from {resumes})" if steps else ""
        return (f"{what}; checkpoints are off (checkpoint.enabled=False): the same command starts {workdir} again "
                f"from step 0{older}")
    if steps:
        members = os.path.join(workdir, "members")
        if os.path.isdir(members):
            where, logs = "its members' metrics.jsonl", [os.path.join(members, m, "metrics.jsonl")
                                                         for m in sorted(os.listdir(members))]
        else:
            where, logs = "its metrics.jsonl", [os.path.join(workdir, "metrics.jsonl")]
        last = max((x for x in map(_last_row_step, logs) if x is not None), default=None)
        past = (f"; {where} also hold{'' if where.startswith('its members') else 's'} rows of steps {steps[-1]} to "
                f"{last}, computed after that checkpoint, which the resume drops and computes again"
                if last is not None and last >= steps[-1] else "")
        return (f"{what}; {workdir} keeps its checkpoint of step {steps[-1]} and the metrics up to it{past}: run "
                "the same command to resume from step " + str(steps[-1]))
    if os.path.isdir(workdir):
        return f"{what} before the first checkpoint; the same command starts {workdir} again from step 0"
    return f"{what} before anything was written"


_LAUNCH_FLAGS = ("coordinator_address", "num_processes", "process_id", "distributed")


def _launch_error(fv, cmd: str) -> str | None:
    """What is wrong with the multi-host options (flags or environment) of ``cmd``, ``None`` when nothing is.

    A ``run`` is one process: multi-host flags on its command line are refused (a run started in N processes
    would train N copies into one directory).  A ``sweep`` given more than one process (or a process id other than
    0) needs the coordinator
    (``--coordinator_address``) or JAX's cluster auto-detection (``--distributed``); without either, every process
    would run the whole sweep on its own into the same directory."""
    if cmd == "run":
        given = [f"--{n}" for n in _LAUNCH_FLAGS if fv[n].present]
        return (f"{', '.join(given)}: a run is one process; the multi-host options are for `quotient-sgd sweep`"
                if given else None)
    # (ranges first, whichever way the processes are found: a count of 0 or -3 passed silently without a
    # coordinator, and --distributed handed an id outside the count to jax.distributed.initialize)
    if fv.num_processes is not None and fv.num_processes < 1:
        return f"--num_processes (or QSGD_NUM_PROCESSES) = {fv.num_processes}: must be >= 1"
    if fv.process_id is not None and not (0 <= fv.process_id < (fv.num_processes or fv.process_id + 1)):
        return (f"--process_id (or QSGD_PROCESS_ID) = {fv.process_id}: must be in [0, {fv.num_processes - 1}] "
                f"(--num_processes = {fv.num_processes})" if fv.num_processes is not None else
                f"--process_id (or QSGD_PROCESS_ID) = {fv.process_id}: must be >= 0")
    if fv.coordinator_address:
        host, _, port = fv.coordinator_address.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            return (f"--coordinator_address (or QSGD_COORDINATOR_ADDRESS) = {fv.coordinator_address!r}: expected "
                    f"HOST:PORT, a host name or address and a port in [1, 65535] (e.g. 10.0.0.1:8476)")
        if fv.num_processes is None or fv.process_id is None:
            return "--coordinator_address needs --num_processes and --process_id"
    elif not fv.distributed and ((fv.num_processes or 1) > 1 or (fv.process_id or 0) != 0):
        return (f"--num_processes = {fv.num_processes}, --process_id = {fv.process_id} (flags or QSGD_NUM_PROCESSES, "
                f"QSGD_PROCESS_ID) without a coordinator: each process would run the whole sweep on its own into the "
                f"same directory. Give --coordinator_address=HOST:PORT (or QSGD_COORDINATOR_ADDRESS), or "
                f"--distributed for JAX's cluster auto-detection")
    return None


def _port_taken(port: int) -> str | None:
    """Why ``port`` cannot be listened on here (``EADDRINUSE``'s text), ``None`` when it can: bound as JAX's
    coordinator binds it (every address, IPv6 and IPv4; ``SO_REUSEADDR``, so a port whose last connections are in
    ``TIME_WAIT`` counts as free, as it does for the coordinator)."""
    import errno
    import socket

    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # (no IPv6 on this machine)
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            return None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return e.strerror or "address already in use"
        finally:
            sock.close()
    return None


#: Seconds a process other than 0 waits for the coordinator's port to accept a connection: JAX's own
#: ``initialization_timeout``, after which its client ends the process with SIGABRT and a C++ stack trace.
_COORDINATOR_WAIT_S = 300.0


def _coordinator_unreachable(address: str, wait_s: float) -> str | None:
    """Why nothing accepts a TCP connection at ``address`` (``HOST:PORT``) within ``wait_s`` seconds (tried every
    half second: process 0 may start later), ``None`` as soon as something does."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)),
                                          timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return None
        except OSError as e:
            why = f"{type(e).__name__}: {e.strerror or e}"
        if time.monotonic() >= deadline:
            return why
        time.sleep(0.5)


def _init_distributed(fv) -> str | None:
    """``jax.distributed.initialize`` as the (checked, :func:`_launch_error`) options of a sweep ask; what stops
    it, said plainly (``None`` when it succeeds or is not asked for).  Nothing is written before: JAX's own
    error escaped as a traceback (``--distributed`` where its auto-detection finds no cluster: "coordinator_address
    should be defined"; a coordinator port already taken: "Failed to start RPC server")."""
    import jax

    # (JAX binds the coordinator on JAX_COORDINATOR_BIND_ADDRESS when set: that port is checked, or none)
    port = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", fv.coordinator_address or "").rpartition(":")[2]
    if fv.coordinator_address and fv.process_id == 0 and port.isdigit():
        taken = _port_taken(int(port))
        if taken:  # (JAX's own "Failed to start RPC server" there, or a segmentation fault in its gRPC service)
            return (f"cannot start the multi-host sweep: process 0 starts the coordinator on the port of "
                    f"--coordinator_address={fv.coordinator_address}, and this machine's port {port} is taken "
                    f"({taken}): another program, or a launch still running, listens on it. Choose another port "
                    f"(the same for every process)")
    if fv.coordinator_address and fv.process_id != 0:
        # (JAX's client aborted the process, status -6 and a C++ stack trace, after 300 s without a coordinator:
        # process 0 never started, or an address no process 0 listens on)
        why = _coordinator_unreachable(fv.coordinator_address, _COORDINATOR_WAIT_S)
        if why:
            return (f"cannot start the multi-host sweep: process {fv.process_id} found no coordinator at "
                    f"--coordinator_address={fv.coordinator_address} within {_COORDINATOR_WAIT_S:g} s ({why}); "
                    f"start process 0 (--process_id=0) with the same address, on the machine HOST names, and "
                    f"check that its port is reachable from this one")
    try:
        if fv.coordinator_address:
            jax.distributed.initialize(coordinator_address=fv.coordinator_address, num_processes=fv.num_processes,
                                       process_id=fv.process_id)
        elif fv.distributed:  # a process count or id given with it completes what the auto-detection finds
            jax.distributed.initialize(num_processes=fv.num_processes, process_id=fv.process_id)
    except Exception as e:  # noqa: BLE001  (whatever JAX raises: nothing was started or written)
        if interrupt_in(e) is not None:
            raise
        text = f"{type(e).__name__}: {str(e).strip()}"
        if fv.coordinator_address:
            return (f"cannot start the multi-host sweep: jax.distributed.initialize(coordinator_address="
                    f"{fv.coordinator_address!r}, num_processes={fv.num_processes}, process_id={fv.process_id}) "
                    f"failed ({text}); check that the address is this job's coordinator (process 0 listens on its "
                    f"port, which must be free) and reachable from every process")
        return (f"--distributed: jax.distributed.initialize() failed ({text}); JAX's cluster auto-detection (TPU "
                f"pods, SLURM, ...) found no cluster it can start from here. Give --coordinator_address=HOST:PORT "
                f"--num_processes=N --process_id=I instead, or leave --distributed out for one process")
    return None


if __name__ == "__main__":
    sys.exit(main())
