"""Shared pieces of the experiments: small models, a chunked recorder, tables and figures.

The recorder trains with :func:`quotient_sgd.optim.train` and :func:`quotient_sgd.optim.quotient_trajectory`
(per-step observables) in chunks of ``hessian_every`` steps (a chunked run equals an unchunked one) and, before
every chunk, evaluates :func:`quotient_sgd.diagnostics.stability_decomposition` (canonical, horizontal and raw
sharpness plus the charge prediction of the gauge factor) and optional held-out metrics.  Between evaluations the
Hessian keys are NaN and ``hessian_step`` is -1, the convention the detectors read.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from quotient_sgd._durable import durable_write
from quotient_sgd.diagnostics import Event, save_events, stability_decomposition
from quotient_sgd.optim import quotient_trajectory, train
from quotient_sgd.optim import flatten_trajectory as _flat

HESSIAN_KEYS = ("sharpness_horizontal", "sharpness_quotient", "sharpness_raw", "lambda_min_horizontal",
                "lambda_min_quotient", "gauge_factor", "gauge_factor_charges", "lr_times_lambda_step")


def _results_base() -> str:
    """``$QSGD_EXPERIMENT_OUT``, or ``experiments/results`` when it is unset or empty."""
    return os.environ.get("QSGD_EXPERIMENT_OUT") or os.path.join(os.path.dirname(__file__), "results")


def out_dir(name: str) -> str:
    """The results directory of experiment ``name`` (``$QSGD_EXPERIMENT_OUT/<name>``, default
    ``experiments/results/<name>``), made if needed; ``SystemExit`` naming it when it cannot be made or written
    (a script's ``main`` checks this before computing: a ``QSGD_EXPERIMENT_OUT`` that is a file ran the whole
    experiment, then failed in a bare ``NotADirectoryError``).  An empty ``QSGD_EXPERIMENT_OUT`` is the default (it
    wrote to ``./<name>/`` of whatever directory the script ran in)."""
    base = _results_base()
    d = os.path.join(base, name)
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"{name}: cannot make the results directory {d!r} (QSGD_EXPERIMENT_OUT={base!r}): "
                         f"{e.strerror or e}; set QSGD_EXPERIMENT_OUT to a writable directory") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise SystemExit(f"{name}: the results directory {d!r} (QSGD_EXPERIMENT_OUT={base!r}) is not writable; set "
                         "QSGD_EXPERIMENT_OUT to a writable directory")
    return d


def parse_overrides(argv=None) -> dict[str, str]:
    """``key=value`` command-line overrides (``scale=paper``, ``steps=2000``)."""
    out = {}
    for a in (sys.argv[1:] if argv is None else argv):
        if "=" not in a:
            raise SystemExit(f"arguments are key=value overrides (e.g. scale=paper), got {a!r}")
        k, v = a.split("=", 1)
        out[k.lstrip("-").replace("config.", "")] = v
    return out


def config_module(name: str):
    """The module ``configs/<name>.py`` (loaded by path: the experiment scripts share the config names)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", name + ".py")
    spec = importlib.util.spec_from_file_location(f"qsgd_configs_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


#: The sizes every experiment config's ``get_config(scale)`` knows (``scale=...`` on the command line).
SCALES = ("cpu", "test", "paper")


def load_config(name: str, argv=None, *, results: bool = False):
    """``configs/<name>.py``'s ``get_config(scale)`` with ``key=value`` overrides applied (typed as the
    default).  A ``scale`` other than :data:`SCALES`, a key the config does not have (or one below a key that is
    no section), a value that is not of the default's type and a value out of its range (:func:`check_values`)
    stop the script (``SystemExit``) with a message naming the key, the value and what is allowed: ``scale=papr``
    ran the CPU default while recording ``scale = 'papr'``, and ``foo.bar=1`` / ``seed.x=1`` / ``checkpoints=5``
    failed in a bare ``KeyError`` / ``TypeError``.

    ``results=True`` (a script's ``main``): the config is the one whose results :func:`save` writes to
    :func:`out_dir`, and ``overwrite=true`` is read from ``argv`` too; the results directory is checked now, before
    anything is computed (:func:`check_results`): results of another config there are not overwritten silently."""
    import difflib

    module = config_module(name)
    if results and any(a in HELP_FLAGS for a in (sys.argv[1:] if argv is None else argv)):
        # (``--help`` stopped the script with "arguments are key=value overrides ..., got '--help'", exit status 1)
        print(usage(name))
        raise SystemExit(0)
    ov = parse_overrides(argv)
    given = dict(ov)
    overwrite = False
    if results and "overwrite" in ov:
        overwrite = _typed("overwrite", ov.pop("overwrite"), False)
        given.pop("overwrite")
    scale = ov.pop("scale", "cpu")
    if scale not in SCALES:
        close = difflib.get_close_matches(scale, SCALES, n=1)
        raise SystemExit(f"{name}: scale={scale!r}: allowed {list(SCALES)} (cpu: the default, test: the tests' fast "
                         f"version, paper: the paper's sizes)" + (f"; did you mean {close[0]!r}?" if close else ""))
    cfg = module.get_config(scale)
    for k, v in ov.items():
        cur = cfg
        parts = k.split(".")
        if parts[-1] == "scale":  # (a nested problem's scale records the sizes get_config(scale) chose for it)
            raise SystemExit(f"{name}: {k}={v!r}: the scale of a nested config is the script's: it is set with "
                             f"scale=... ({list(SCALES)}), which sizes every part; {k} alone would only relabel it")
        for depth, p in enumerate(parts):
            if not hasattr(cur, "keys"):
                above = ".".join(parts[:depth])
                raise SystemExit(f"{name}: config key {k!r}: {above!r} is {type(cur).__name__} {cur!r}, not a "
                                 f"section; set it as {above}=VALUE")
            if p not in cur:
                where = ".".join(parts[:depth])
                close = difflib.get_close_matches(p, list(cur.keys()), n=1)
                raise SystemExit(f"{name}: unknown config key {k!r}"
                                 + (f" (did you mean {'.'.join([*parts[:depth], close[0]])!r}?)" if close else "")
                                 + f"; keys {'of ' + repr(where) if where else 'here'}: {sorted(cur.keys())}")
            if depth < len(parts) - 1:
                cur = cur[p]
        if hasattr(cur[parts[-1]], "keys"):
            raise SystemExit(f"{name}: config key {k!r} is a section (keys {sorted(cur[parts[-1]].keys())}), not a "
                             f"value; set one of its keys, e.g. {k}.{sorted(cur[parts[-1]].keys())[0]}=VALUE")
        cur[parts[-1]] = _typed(k, v, cur[parts[-1]])
    check_values(name, cfg)
    if results:
        _LOADED[name] = {"config": _plain(cfg), "overrides": given, "overwrite": overwrite}
        out_dir(name)  # (made, or refused by name, before anything is computed)
        check_results(name)
    return cfg


#: Command-line arguments that ask a script for its usage (:func:`usage`) instead of running it.
HELP_FLAGS = ("-h", "--help", "help")


def usage(name: str) -> str:
    """What ``python experiments/<name>.py --help`` prints: the script's docstring, then every config key with its
    CPU default and what it allows (:data:`VALUE_RULES`), the scales and ``overwrite=true``."""
    import ast

    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, f"{name}.py")) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    lines = [doc, "", f"usage: python experiments/{name}.py [key=value ...]", "",
             "  scale=cpu | test | paper   the sizes (default cpu)",
             "  overwrite=true             replace results of another config in the output directory", "",
             "config keys (CPU default; allowed):"]
    unread = UNREAD_KEYS.get(name, {})
    for key, value in _leaves(config_module(name).get_config("cpu")):
        if key.rsplit(".", 1)[-1] == "scale":
            continue
        rule = VALUE_RULES.get(key.rsplit(".", 1)[-1])
        shown = json.dumps(list(value)) if isinstance(value, tuple) else repr(value)
        if key in unread:
            lines.append(f"  {key}={shown}   (not read by this experiment, refused; instead: {unread[key]})")
        else:
            lines.append(f"  {key}={shown}" + (f"   ({rule[1]})" if rule else ""))
    lines += ["", "outputs: $QSGD_EXPERIMENT_OUT/" + name + "/ (default experiments/results/" + name + "/), see "
              "experiments/README.md"]
    return "\n".join(lines)


#: ``name -> {dotted key: what to set instead}``: keys of experiment ``name``'s config that it does not read and
#: refuses (registered by the script; experiment 6's ``problem.seed`` and the like).  :func:`usage` shows them as
#: such: ``--help`` listed ``problem.seed=0 (an integer in [0, 2147483647])`` among the keys to set, and setting it
#: stopped the script.
UNREAD_KEYS: dict[str, dict[str, str]] = {}


#: ``name -> {"config", "overrides", "overwrite"}`` of the config a script's ``main`` loaded with ``results=True``
#: (what :func:`save` records in ``result.json`` and checks the results directory against).
_LOADED: dict[str, dict] = {}


#: How ``result.json`` writes the floats strict JSON has no number for (as ``events.json`` does).
_NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def strict_json(x):
    """``x`` as strict JSON values, what :func:`save` writes: NaN / +-inf as the strings ``"nan"`` / ``"inf"`` /
    ``"-inf"`` (as ``events.json`` writes them; :func:`load_result` reads them back), NumPy and 0-d JAX numbers as
    the Python ``int`` / ``float`` / ``bool`` they hold, arrays as (nested) lists, tuples as lists, mapping keys as
    strings.  ``result.json`` held bare ``NaN`` / ``Infinity`` (an edge never reached, a slice of no shock), which
    strict readers (``jq``, JavaScript's ``JSON.parse``) refuse; an array in it failed half-written (``default=float``
    of a 1-d array), and a NumPy integer was written as a float.

    Raises:
        TypeError: a value that is none of these (named, with its type)."""
    if isinstance(x, dict):
        return {str(k): strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)) and np.ndim(x) > 0:
        return strict_json(np.asarray(x).tolist())
    if hasattr(x, "item") and np.ndim(x) == 0 and not isinstance(x, (str, bytes)):
        x = x.item()
    if x is None or isinstance(x, (bool, str, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else ("nan" if x != x else "inf" if x > 0 else "-inf")
    raise TypeError(f"result.json: {x!r} (a {type(x).__name__}) is not a JSON value; need numbers, strings, bools, "
                    "None, lists, arrays or dicts of them")


def from_strict_json(x):
    """The inverse of :func:`strict_json`'s non-finite floats: the strings ``"nan"`` / ``"inf"`` / ``"-inf"`` back
    to floats, in nested lists and dicts."""
    if isinstance(x, dict):
        return {k: from_strict_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_strict_json(v) for v in x]
    return _NON_FINITE[x] if isinstance(x, str) and x in _NON_FINITE else x


def load_result(path: str) -> dict:
    """The ``result.json`` at ``path`` as :func:`save` recorded it, the strings ``"nan"`` / ``"inf"`` / ``"-inf"``
    read back as floats (:func:`from_strict_json`)."""
    with open(path) as f:
        return from_strict_json(json.load(f))


def _plain(cfg) -> dict:
    """The resolved config as strict JSON values (tuples as lists, non-finite floats as strings), as
    ``result.json`` records it."""
    return strict_json(cfg.to_dict())


def _flat_keys(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_results(name: str) -> None:
    """``SystemExit`` when :func:`out_dir`'s ``<name>/result.json`` holds the results of another config than the
    one loaded for ``name`` (:func:`load_config` with ``results=True``; the differing keys named, old -> new), or
    of an unrecorded one (written before configs were recorded), unless ``overwrite=true`` was given: a run with
    ``seed=3`` replaced the seed-0 results without a word.  The same config run again replaces its results."""
    loaded = _LOADED.get(name)
    if loaded is None or loaded["overwrite"]:
        return
    base = _results_base()
    path = os.path.join(base, name, "result.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    old_cfg = old.get("config") if isinstance(old, dict) else None
    if isinstance(old_cfg, dict):
        # compared in strict_json's form (a result.json written before it held bare NaN / Infinity)
        try:
            old_cfg = strict_json(old_cfg)
        except TypeError:
            old_cfg = None
    if old_cfg == loaded["config"]:
        return
    how = ("; pass overwrite=true to replace them, or write elsewhere with QSGD_EXPERIMENT_OUT=DIR (results go to "
           f"DIR/{name}/)")
    if not isinstance(old_cfg, dict):
        raise SystemExit(f"{name}: {path} holds results that record no config (written before result.json recorded "
                         f"it, or not by this script){how}")
    a, b = _flat_keys(old_cfg), _flat_keys(loaded["config"])
    diff = {k: (a.get(k, "(absent)"), b.get(k, "(absent)")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    shown = ", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in list(diff.items())[:8])
    raise SystemExit(f"{name}: {path} holds the results of another config ({shown}"
                     + (f", and {len(diff) - 8} more" if len(diff) > 8 else "") + f"){how}")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ints(v, lo: int, distinct: bool = False, increasing: bool = False) -> bool:
    """A non-empty sequence of integers >= ``lo`` (distinct, or strictly increasing, when asked)."""
    return (isinstance(v, (tuple, list)) and len(v) > 0 and all(_int(x) and x >= lo for x in v)
            and (not distinct or len(set(v)) == len(v))
            and (not increasing or all(a < b for a, b in zip(v, v[1:]))))


_SEED_MAX = 2**31 - 1
_POSITIVE_INT = (lambda v: _int(v) and v >= 1, "an integer >= 1")
_POSITIVE = (lambda v: _real(v) and v > 0, "a finite number > 0")
_NONNEGATIVE = (lambda v: _real(v) and v >= 0, "a finite number >= 0")
_FRACTION = (lambda v: _real(v) and 0 < v < 1, "a number in (0, 1)")
_DECAY = (lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1)")
#: Digits images in the training split of ``quotient_sgd.data.digits`` (its default test_fraction 0.25).
_DIGITS_TRAIN = 1797 - round(0.25 * 1797)

#: What each key of the experiment configs allows, by its last dotted part (``problem.width`` is a ``width``):
#: ``(predicate, allowed in words)``.  Checked on the resolved config (defaults and ``key=value`` overrides):
#: ``width=-3``, ``num_steps=0`` or ``norm=foo`` were accepted and failed later in a model, a data set or an
#: empty table, or (``checkpoints=[100, 25]``) took a slice at another step than the one it was labelled with.
VALUE_RULES: dict[str, tuple] = {
    "seed": (lambda v: _int(v) and 0 <= v <= _SEED_MAX, f"an integer in [0, {_SEED_MAX}]"),
    "seeds": (lambda v: _ints(v, 0, distinct=True) and max(v) <= _SEED_MAX,
              f"a non-empty list of distinct integers in [0, {_SEED_MAX}], e.g. [0, 1, 2]"),
    **{k: _POSITIVE_INT for k in ("num_examples", "input_dim", "teacher_hidden", "width", "num_steps",
                                  "hessian_every", "lanczos", "eval_every", "max_steps", "num_heads", "num_layers",
                                  "spike_smooth")},
    # (n = 4 ran the training and the flow, then failed on an empty reduction: the slice's min L'' is read at the
    # points two or more away from its ends, where np.gradient's stencils are centred)
    "n": (lambda v: _int(v) and v >= 5, "an integer >= 5 (grid points on a slice; min L'' is read at the points "
                                        "two or more away from its ends)"),
    # (d_model = 2 passed here and failed in the Transformer's traceback: a LayerNorm over two features reads its
    # input through one sign, so nothing before it gets a gradient)
    "d_model": (lambda v: _int(v) and v >= 3, "an integer >= 3 (a LayerNorm over two features reads its input "
                                              "through one sign: nothing before it gets a gradient)"),
    "p": (lambda v: _int(v) and v >= 2, "an integer >= 2 (the modulus)"),
    "batch_size": (lambda v: _int(v) and 1 <= v <= _DIGITS_TRAIN,
                   f"an integer in [1, {_DIGITS_TRAIN}] (the digits training split)"),
    "hidden": (lambda v: _ints(v, 1), "a non-empty list of widths >= 1, e.g. [32, 32]"),
    "channels": (lambda v: _ints(v, 1), "a non-empty list of channel counts >= 1, e.g. [8, 16]"),
    "checkpoints": (lambda v: _ints(v, 0, increasing=True),
                    "a non-empty list of GD steps >= 0 in increasing order, e.g. [0, 25, 100]"),
    # (distinct: a half-width given twice sliced, flowed and tabulated the same slices twice, and each slice shock
    # was an event twice in events.json)
    "extents": (lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(_real(x) and x > 0 for x in v)
                and len(set(v)) == len(v), "a non-empty list of distinct finite half-widths > 0, e.g. [0.02, 0.1]"),
    **{k: _POSITIVE for k in ("teacher_gain", "eta_lambda0", "lr", "nu_rel", "flow_time_factor", "fold_target",
                              "track_target")},
    # (experiment 6 gives the same init_scale to both policies: 2 passed here, trained the constant and cosine
    # runs, then failed in shock_aware_lr's own ValueError, "cap" never lengthening the inner step; below its
    # default min_scale, 0.001, likewise)
    "init_scale": (lambda v: _real(v) and 1e-3 <= v <= 1,
                   "a number in [0.001, 1] (the first step's scale: shock_aware_lr's min_scale is 0.001, and "
                   "policy 'cap' never lengthens the inner optimiser's step)"),
    **{k: _NONNEGATIVE for k in ("twin_scale", "weight_decay")},
    "max_scale": (lambda v: _real(v) and v >= 1, "a finite number >= 1"),
    "spike_factor": (lambda v: _real(v) and v > 1, "a finite number > 1"),
    "drop_factor": _FRACTION,
    "train_fraction": _FRACTION,
    "alpha": _FRACTION,
    "tail_fraction": (lambda v: _real(v) and 0 < v <= 1, "a number in (0, 1]"),
    "b1": _DECAY,
    "b2": _DECAY,
    # (experiment 5's ``model``: its overrides of experiment 1's config, each entry checked by
    # hj_slices.model_config, which names the entry; --help showed ``model=[]`` with nothing allowed)
    "model": (lambda v: isinstance(v, (tuple, list)),
              "a list of key=value overrides of experiment 1's config (configs/edge_of_stability.py), e.g. "
              "'[\"hidden=[8]\"]'; not scale, seed, num_steps, hessian_every, twin_scale"),
    "norm": (lambda v: v == "layer", "'layer' (the experiment follows LayerNorm's scale-invariant conv blocks; "
                                     "'batch' keeps running statistics it does not thread)"),
}


def _leaves(cfg, prefix: str = ""):
    for k in cfg.keys():
        v = cfg[k]
        if hasattr(v, "keys"):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def check_values(name: str, cfg) -> None:
    """Every value of the experiment config ``cfg`` in its range (:data:`VALUE_RULES`), or ``SystemExit`` naming
    the experiment, the dotted key, the value and what is allowed; then the rules between keys (a head count that
    divides ``d_model``, ``channels`` of at least 2 under LayerNorm)."""
    def refuse(key, value, allowed):
        raise SystemExit(f"{name}: {key}={value!r}: allowed {allowed}")

    leaves = dict(_leaves(cfg))
    for key, value in leaves.items():
        rule = VALUE_RULES.get(key.rsplit(".", 1)[-1])
        if rule is not None and not rule[0](value):
            refuse(key, list(value) if isinstance(value, tuple) else value, rule[1])
    for prefix in {k.rpartition(".")[0] for k in leaves}:
        p = f"{prefix}." if prefix else ""
        heads, d = leaves.get(f"{p}num_heads"), leaves.get(f"{p}d_model")
        if heads is not None and d is not None and d % heads:
            refuse(f"{p}num_heads", heads, f"a divisor of {p}d_model = {d} (each head gets d_model / num_heads "
                                           f"features)")
        ch = leaves.get(f"{p}channels")
        if ch is not None and leaves.get(f"{p}norm") == "layer" and min(ch) < 3:
            refuse(f"{p}channels", list(ch), "widths >= 3 with norm='layer' (a LayerNorm over one channel outputs "
                                             "its bias alone; over two it reads its input through one sign, so "
                                             "nothing before it gets a gradient)")


def _element(key: str, value, like):
    """An element ``value`` of a JSON list given for ``key``, as the type of ``like`` (an element of the
    default): an int stays an int, a float takes an int, a string a string."""
    if isinstance(like, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(like, bool)
    elif isinstance(like, int):
        ok = isinstance(value, int)
    elif isinstance(like, float):
        ok = isinstance(value, (int, float))
    else:
        ok = isinstance(value, type(like))
    if not ok:
        kind = {"int": "an int", "float": "a number", "str": "a string", "bool": "a bool"}.get(type(like).__name__,
                                                                                              type(like).__name__)
        raise ValueError(f"element {value!r} is not {kind}, as the default's elements are")
    return float(value) if isinstance(like, float) and not isinstance(like, bool) else value


def _typed(key: str, value: str, old):
    """``value`` (a command-line string) as the type of the default ``old``: ``true`` / ``false`` for booleans
    (``bool("False")`` is ``True``), JSON lists for tuples and lists (their elements of the type of the default's
    elements, when it has any)."""
    try:
        if isinstance(old, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return value.lower() in ("true", "1")
        if isinstance(old, (tuple, list)):
            items = json.loads(value)
            if not isinstance(items, list):
                raise ValueError(f"a JSON list is needed, e.g. {key}={json.dumps(list(old) or [1])}")
            if old:
                items = [_element(key, x, old[0]) for x in items]
            return type(old)(items)
        return type(old)(value)
    except ValueError as e:
        raise SystemExit(f"{key}={value!r}: expected {type(old).__name__} like the default {old!r} ({e})") from None


# --- models ------------------------------------------------------------------------------------------------
def split_model(model):
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, model.symmetries()


def mse(graphdef, params, batch):
    x, y = batch
    pred = nnx.merge(graphdef, params)(x)
    return 0.5 * jnp.mean(jnp.sum(jnp.square(pred - y), axis=-1))


def xent(graphdef, params, batch):
    x, y = batch
    logp = nnx.merge(graphdef, params)(x)
    if logp.ndim == 3:  # sequence model: predict at the last position
        logp = logp[:, -1, :]
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def accuracy(graphdef, params, batch):
    x, y = batch
    out = nnx.merge(graphdef, params)(x)
    if out.ndim == 3:
        out = out[:, -1, :]
    return jnp.mean((jnp.argmax(out, axis=-1) == y).astype(jnp.float32))


def _const_batch(batch, step, key):
    return batch


# --- the recorder ------------------------------------------------------------------------------------------
def record(loss_fn: Callable, params, tx, group, batch, num_steps: int, *, lr=None, hessian_every: int = 10,
           lanczos: int = 20, seed: int = 0, evals: dict[str, Callable] | None = None, batch_fn=None,
           hessian_batch=None, decomposition: bool = True, observables=None, raw: bool = True, spec=None):
    """Train ``num_steps`` steps, recording per-step observables and, every ``hessian_every`` steps, the
    stability decomposition and ``evals`` (``name -> fn(params) -> scalar or {key: scalar}``).

    ``loss_fn(params, batch)``; ``batch`` is the full batch (full-batch GD) unless ``batch_fn(step, key)`` is
    given; ``hessian_batch`` (default ``batch``) is the batch the Hessian is evaluated on.  ``spec``: the
    :class:`~quotient_sgd.optim.SGDSpec` of an SGD ``tx`` (the fold / shock numbers then use its learning rate
    and need no canonical gradient per step).  ``observables="curvature"``: full-batch training in the plain
    loop :func:`_curvature_chunk` (loss, grad norm, directional curvature, fold and shock numbers), used by the
    full-batch experiments (written while ``quotient_trajectory``'s curvature had a bug, fixed in d8d04c3; the
    plain loop is also cheaper: no canonical gradient per step).
    Returns ``(params, trajectory as a flat dict of numpy arrays, wall seconds of training alone)``: each chunk
    length is run once untimed before it is timed (the chunks are pure: ``donate=False``), so the seconds hold no
    compilation.
    """
    qtx = None if observables == "curvature" else quotient_trajectory(tx, group, observables=observables, spec=spec)
    data = batch_fn if batch_fn is not None else functools.partial(_const_batch, batch)
    hb = batch if hessian_batch is None else hessian_batch
    decomp = functools.partial(decomposition_fn(loss_fn, hb, group, lanczos, raw), lr=lr)
    ev = {k: jax.jit(f) for k, f in (evals or {}).items()}
    opt_state = None
    chunks, side = [], []
    key = jax.random.key(seed)
    train_time = 0.0
    warm = set()  # chunk lengths run once untimed (each compiles on its first call)
    for start in range(0, num_steps, hessian_every):
        n = min(hessian_every, num_steps - start)
        row = {"step": start}
        if decomposition:
            row.update({k: float(v) for k, v in decomp(params, jax.random.fold_in(key, start)).items()})
        for k, f in ev.items():
            v = f(params)
            if isinstance(v, dict):
                row.update({f"{k}/{kk}": float(vv) for kk, vv in v.items()})
            else:
                row[k] = float(v)
        side.append(row)
        if observables == "curvature":
            if opt_state is None:
                zeros = jax.tree.map(jnp.zeros_like, params)
                # the step length h in the parameters' precision, as the loop computes it (a float32 zero was a
                # scan carry of another type than the float64 h of float64 parameters: under JAX_ENABLE_X64 the
                # full-batch experiments failed in a bare "carry input and carry output must have equal types")
                h0 = jnp.zeros((), jnp.result_type(*jax.tree.leaves(params)))
                opt_state, ccarry = tx.init(params), (zeros, zeros, h0)
            chunk = functools.partial(_curvature_chunk, params, opt_state, ccarry, batch, loss_fn=loss_fn, tx=tx,
                                      num_steps=n)
        else:
            chunk = functools.partial(train, loss_fn, params, qtx, data, num_steps=n, opt_state=opt_state,
                                      start_step=start, key=key, donate=False)
        if n not in warm:
            # compiled (or found compiled) outside the timed call: the first chunk of each length timed its
            # compilation, 0.66 s of experiment 1's balanced run against 0.012 s for its twin, which reuses it
            jax.block_until_ready(chunk()[-1]["loss"])
            warm.add(n)
        t0 = time.perf_counter()
        result = chunk()
        jax.block_until_ready(result[-1]["loss"])
        train_time += time.perf_counter() - t0
        if observables == "curvature":
            params, opt_state, ccarry, traj = result
        else:
            params, opt_state, traj = result
        chunks.append({k: np.asarray(v) for k, v in _flat(traj).items()})
    out = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    out["step"] = np.arange(num_steps)
    out["hessian_step"] = np.full(num_steps, -1, np.int64)
    keys = sorted({k for r in side for k in r if k != "step"})
    for k in keys:
        out[k] = np.full(num_steps, np.nan)
    for r in side:
        out["hessian_step"][r["step"]] = r["step"]
        for k in keys:
            out[k][r["step"]] = r.get(k, np.nan)
    return params, out, train_time


@functools.partial(jax.jit, static_argnames=("loss_fn", "tx", "num_steps"))
def _curvature_chunk(params, opt_state, carry, batch, *, loss_fn, tx, num_steps):
    """Plain full-batch loop that also measures the directional curvature along every step (THEORY section 4):
    ``kappa_k = <g_{k+1} - g_k, Delta_k> / |Delta_k|^2``; fold / shock numbers ``h max(0, +-kappa)`` with
    ``h = |Delta| / |g|`` (``= lr`` for SGD).  Row ``k`` holds the numbers of step ``k - 1`` (0 at the first
    step), the convention of :func:`quotient_sgd.optim.quotient_trajectory`."""

    def dot(a, b):
        return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    def body(c, _):
        p, s, (g_prev, u_prev, h_prev) = c
        loss, g = jax.value_and_grad(loss_fn)(p, batch)
        dd = dot(u_prev, u_prev)
        ok = dd > 0
        kappa = jnp.where(ok, (dot(g, u_prev) - dot(g_prev, u_prev)) / jnp.where(ok, dd, 1.0), 0.0)
        u, s = tx.update(g, s, p)
        gg = dot(g, g)
        h = jnp.where(gg > 0, jnp.sqrt(dot(u, u) / jnp.where(gg > 0, gg, 1.0)), 0.0)
        out = {"loss": loss, "grad_norm": jnp.sqrt(gg), "curvature": kappa,
               "fold_number": h_prev * jnp.maximum(kappa, 0.0), "shock_number": h_prev * jnp.maximum(-kappa, 0.0)}
        return (optax.apply_updates(p, u), s, (g, u, h)), out

    (params, opt_state, carry), traj = jax.lax.scan(body, (params, opt_state, carry), None, length=num_steps)
    return params, opt_state, carry, traj


_DECOMP_CACHE: dict = {}


def decomposition_fn(loss_fn, batch, group, lanczos: int = 20, raw: bool = True):
    """``(params, key, lr=None) -> stability_decomposition(...)`` jitted once per (loss, batch, group, settings):
    runs of one experiment that share them (twins, learning rates) share the compilation."""
    ck = (id(loss_fn), id(batch), id(group), lanczos, raw)
    if ck not in _DECOMP_CACHE:
        hloss = functools.partial(_bind_batch, loss_fn, batch)

        @jax.jit
        def f(p, k, lr):
            d = stability_decomposition(hloss, group, p, key=k, num_matvecs=lanczos, raw=raw)
            lam = d["sharpness_horizontal"]
            d["lr_times_lambda_step"] = lr.astype(lam.dtype) * lam
            return d

        def call(p, k, lr=None):
            # the learning rate in the parameters' precision: a float32 lr made float64 runs' lr_times_lambda_step
            # off by 1.5e-8 relative (lr = 0.1), and failed under strict dtype promotion
            dt = jnp.result_type(*jax.tree.leaves(p))
            d = f(p, k, jnp.asarray(jnp.nan if lr is None else lr, dt))
            if lr is None:
                d = {kk: v for kk, v in d.items() if kk != "lr_times_lambda_step"}
            return d

        _DECOMP_CACHE[ck] = (call, loss_fn, batch, group)  # keep the keyed objects alive
    return _DECOMP_CACHE[ck][0]


def _bind_batch(loss_fn, batch, params):
    return loss_fn(params, batch)


def subsample(traj, keys):
    """The trajectory restricted to the refresh steps (``hessian_step == step``): a coarse trajectory whose
    every key is fresh, e.g. for change-point detection on periodically evaluated observables."""
    m = traj["hessian_step"] == traj["step"]
    return {k: traj[k][m] for k in keys if k in traj}


def sampled(traj, key):
    """``(steps, values)`` of a periodically refreshed key."""
    m = (traj["hessian_step"] == traj["step"]) & np.isfinite(traj[key])
    return traj["step"][m], traj[key][m]


# --- output --------------------------------------------------------------------------------------------------
def save(name: str, traj: dict, events: list[Event], table: list[dict], extra: dict | None = None,
         files: dict[str, Callable[[str], None]] | None = None) -> str:
    """Write the results of experiment ``name`` to :func:`out_dir`: ``trajectory.npz``, ``events.json``,
    ``result.json`` (the table, ``extra``, and the resolved ``config`` and the command line's ``overrides`` that
    produced them, when the script loaded its config with ``load_config(..., results=True)``; strict JSON,
    :func:`strict_json`: NaN / +-inf as ``"nan"`` / ``"inf"`` / ``"-inf"``, read back by :func:`load_result`) and
    ``result.md``; ``files`` (``{file name: write(path)}``): the script's other outputs (the figure, experiment 1's
    ``trajectory_regauged.npz``).
    Results of another config found there are not overwritten without ``overwrite=true``
    (:func:`check_results`, checked again here).

    ``result.json`` names the config of every file beside it: the old one is removed before the first file is
    written and the new one is written last (atomically), so that a run stopped while saving (a
    ``KeyboardInterrupt``, a figure that fails) leaves no ``result.json`` rather than one of another run.  Written
    first, ``result.json`` of the old config stayed beside the new ``trajectory.npz`` when ``events.json`` failed,
    and the new ``result.json`` beside the old figure (and experiment 1's old ``trajectory_regauged.npz``) when the
    figure failed."""
    check_results(name)
    d = out_dir(name)
    loaded = _LOADED.get(name)
    record = {"table": table, **(extra or {})}
    if loaded is not None:
        record.update(config=loaded["config"], overrides=loaded["overrides"])
    # strict JSON (no bare NaN / Infinity), made in full before any file is touched: a value that is not JSON left
    # a half-written result.json, which the next run then read as results recording no config
    text = json.dumps(strict_json(record), indent=1, allow_nan=False)
    md = markdown_table(table)
    result = os.path.join(d, "result.json")
    if os.path.isfile(result):
        os.remove(result)
    with durable_write(os.path.join(d, "trajectory.npz"), "wb") as f:
        np.savez_compressed(f, **traj)
    save_events(os.path.join(d, "events.json"), events)
    for fname, write in (files or {}).items():
        write(os.path.join(d, fname))
    with durable_write(os.path.join(d, "result.md")) as f:
        f.write(md)
    with durable_write(result) as f:
        f.write(text)
    return d


def markdown_table(rows: list[dict]) -> str:
    """``rows`` as a Markdown table (``result.md``): one column per key of any row, in order of appearance, floats
    to 4 significant digits, a ``|`` inside a key or value escaped as ``\\|``.  Unescaped, the column names
    ``|w|^2 start`` (experiment 4) and ``shock number lr*|lambda_min|`` (experiment 5) split into three cells
    each: the header had more cells than the delimiter row, so the file was no table, and read cell by cell the
    numbers stood under other columns' names."""
    if not rows:
        return "(empty)\n"
    cols = list(rows[0])
    for r in rows[1:]:
        cols += [c for c in r if c not in cols]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    def cell(v):
        return fmt(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def first(events, kind, variant=None, after: int = -1, **details):
    for e in events:
        if e.kind == kind and (variant is None or e.variant == variant) and e.step > after and all(
                e.details.get(k) == v for k, v in details.items()):
            return e
    return None


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as _plt

    return _plt


def save_figure(fig, path: str) -> None:
    """Lay out, write (120 dpi) and close an experiment's figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt().close(fig)


def mark_events(ax, events, kinds=None, **kw):
    colors = {"edge_of_stability": "tab:red", "catapult": "tab:purple", "transition": "tab:green",
              "loss_spike": "tab:orange", "fold": "tab:brown", "shock": "tab:pink", "divergence": "k"}
    for e in events:
        if kinds is None or e.kind in kinds:
            ax.axvline(e.step, color=colors.get(e.kind, "gray"), lw=0.8, ls="--", alpha=0.7, **kw)
