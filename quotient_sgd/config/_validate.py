"""Validation of a config, once, on load: ``ConfigDict -> Settings`` or a :class:`ConfigError` naming the key,
the offending value and what is allowed.  Nothing is computed or written before this passes."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import importlib.machinery
import importlib.util
import math
import numbers
import os
import re
from typing import Any, Mapping

import numpy as np

from ._configdict import array_value, float_overflow, int_text
from ._settings import (
    CURVATURE_BATCHES,
    DATASETS,
    MODELS,
    OPTIMIZERS,
    SECTIONS,
    SWEEP_AXES,
    SWEEP_MODES,
    SYMMETRY_MODES,
    DataSettings,
    ModelSettings,
    Settings,
)

#: Element types of the tuple-valued fields.
_ELEMENT_TYPES = {
    "model.hidden": int, "model.channels": int, "symmetry.components": str, "observables.names": str,
    "sweep.seed": int, "sweep.lr": float, "sweep.batch_size": int, "sweep.weight_decay": float,
    "sweep.momentum": float, "sweep.init_gauge": float,
}


#: Seeds are int32 inputs of the compiled programs.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class ConfigError(ValueError):
    """A config key has an unknown name, a wrong type or an out-of-range value."""


def _err(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config.{key} = {value!r}: {allowed}")


def _to_plain(cfg) -> dict:
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    return dict(cfg)


def _is_bool(value: Any) -> bool:
    """A Python or NumPy boolean (``np.bool_`` is not a ``bool``)."""
    return isinstance(value, (bool, np.bool_))


def _typed(key: str, value: Any, default: Any) -> Any:
    """``value`` coerced to the Python type of ``default`` (int -> float allowed, float -> int not, even for a
    whole number: ``1.0`` for an int key is refused as ``--config.seed=1.0`` is; NumPy scalars such as the
    elements of ``tuple(np.arange(4))`` count as the numbers they hold), or a ConfigError.  A bool is never a
    number and a number never a bool.  A 0-d array (NumPy's or JAX's: ``jnp.float32(0.1)``) counts as the value
    it holds, a 1-D array (``np.logspace(-3, -1, 4)``) as the tuple of its values (:func:`array_value`)."""
    value = array_value(value)
    if isinstance(default, bool):
        if _is_bool(value):
            return bool(value)
        raise _err(key, value, f"expected a bool (True/False), got {type(value).__name__}")
    if isinstance(default, int):
        if isinstance(value, numbers.Integral) and not _is_bool(value):
            value = int(value)
            if int_text(value).startswith("an integer"):  # (too long to print: every message naming it failed in
                # a bare "ValueError: Exceeds the limit (4300 digits) for integer string conversion")
                raise ConfigError(f"config.{key} = {int_text(value)}: need an int in the int32 range "
                                  f"[{INT32_MIN}, {INT32_MAX}] (integer settings are int32 in the compiled programs)")
            return value
        # (a float is refused even when it holds a whole number, as --config.seed=1.0 and a ConfigDict's int key
        # are: --config.sweep.seed="(1.0,)" was read as (1,))
        raise _err(key, value, f"expected an int, got {type(value).__name__}"
                   + (f" (write {int(value)} without a decimal point)" if isinstance(value, numbers.Real)
                      and not _is_bool(value) and math.isfinite(value) and float(value).is_integer() else ""))
    if isinstance(default, float):
        if isinstance(value, numbers.Real) and not _is_bool(value):
            too_large = float_overflow(value)  # (10**400: a bare "OverflowError: int too large to convert to float")
            if too_large is not None:
                raise ConfigError(f"config.{key}: {too_large}; use a number within float32's range")
            return float(value)
        raise _err(key, value, f"expected a float, got {type(value).__name__}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise _err(key, value, f"expected a string, got {type(value).__name__}")
    if isinstance(default, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _err(key, value, f"expected a tuple/list, got {type(value).__name__}")
        et = _ELEMENT_TYPES.get(key)
        if et is None:
            return tuple(value)
        if (len(value) == 1 and isinstance(value[0], str)
                and value[0].strip()[:1] in ("(", "[")):  # an override ml_collections could not parse as a tuple
            if et is str:  # (unquoted names: --config.observables.names=(loss,grad_norm))
                names = [n.strip().strip("'\"") for n in value[0].strip().strip("()[]").split(",") if n.strip()]
                example = repr(tuple(names or ["a", "b"]))
                raise _err(key, value[0], f"expected a tuple of strings, got a string that does not parse as one: "
                                          f"quote each name, e.g. --config.{key}=\"{example}\"")
            example = "(0.1, 0.3)" if et is float else "(64, 32)"
            raise _err(key, value[0], f"expected a tuple of {et.__name__}s, got a string that does not parse as "
                                      f"one (e.g. --config.{key}='{example}')")
        return tuple(_typed(f"{key}[{i}]", v, et(0) if et is not str else "") for i, v in enumerate(value))
    raise TypeError(f"schema field {key} has an unsupported default {default!r}")


def _close_key(key: str, allowed) -> list[str]:
    """The key of ``allowed`` that an unknown ``key`` most likely meant: the one differing only in case
    (``optim.LR`` -> ``lr``: ``difflib`` finds no match for a two-letter key spelt in capitals), else the closest
    spelling (``difflib``), else none."""
    allowed = list(allowed)
    return [a for a in allowed if a.lower() == str(key).lower()][:1] or difflib.get_close_matches(str(key), allowed,
                                                                                                  n=1)


def _section(name: str, cls, values: Mapping[str, Any]):
    # a section given as a ConfigDict (or FrozenConfigDict) inside a plain dict, e.g. validate(dict(config, steps=5)):
    # no Mapping, it was refused as "config.optim = lr: 0.2 ...: expected a section (ConfigDict)"
    if not isinstance(values, Mapping) and callable(getattr(values, "to_dict", None)):
        values = values.to_dict()
    if not isinstance(values, Mapping):
        keys = [f.name for f in dataclasses.fields(cls)]
        raise _err(name, values, f"expected a section (ConfigDict) with keys {keys}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if k not in fields:
            close = _close_key(k, fields)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config.{name}.{k}: unknown key{hint}; allowed keys of config.{name}: "
                              f"{sorted(fields)}")
        kwargs[k] = _typed(f"{name}.{k}", v, fields[k].default)
    return cls(**kwargs)


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise _err(key, value, allowed)


def _check_choice(key: str, value: str, choices) -> None:
    """``value`` one of ``choices``, or a ConfigError listing them (with the closest, or the one differing only
    in case, as a suggestion)."""
    choices = list(choices)
    if value in choices:
        return
    close = [c for c in choices if c.lower() == str(value).lower()] or difflib.get_close_matches(str(value), choices,
                                                                                             n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise _err(key, value, f"allowed: {choices}{hint}")


#: Images in scikit-learn's bundled digits (``quotient_sgd.data.digits``).
DIGITS_SIZE = 1797


def split_sizes(d: DataSettings) -> tuple[int, int]:
    """``(train, test)`` example counts that ``d`` describes (arithmetic only, as :mod:`quotient_sgd.data`
    splits: no data is built)."""
    if d.name in ("teacher_student", "sparse_parity"):
        return d.n_train, d.n_test
    if d.name == "modular_arithmetic":
        n = int(round(d.train_fraction * d.p * d.p))
        return n, d.p * d.p - n
    n_test = int(round(d.test_fraction * DIGITS_SIZE))
    return DIGITS_SIZE - n_test, n_test


def _fraction_range(total: int) -> str:
    """``"[lo, hi]"``: fractions ``f`` of ``total`` examples that leave at least one on each side of a split of
    ``round(f * total)`` (Python's ``round``, as :mod:`quotient_sgd.data` splits), each written with the fewest
    significant digits (at least 3) at which the written number itself splits so.  (At three digits the upper end
    was written ``1`` from ``data.p = 55`` on, ``[0.000117, 1]`` for ``data.p = 113``: a fraction refused.)"""
    def ok(f: float) -> bool:
        return 0 < f < 1 and 1 <= round(f * total) <= total - 1

    def text(x: float) -> str:
        return next((t for t in (f"{x:.{k}g}" for k in range(3, 18)) if ok(float(t))), repr(x))

    return f"[{text(1.5 / total)}, {text(1 - 1.5 / total)}]"


def train_size(d: DataSettings) -> int:
    """The number of training examples ``d`` describes (:func:`split_sizes`)."""
    return split_sizes(d)[0]


def _check_data(d: DataSettings) -> None:
    _check_choice("data.name", d.name, DATASETS)
    _check(0 <= d.seed <= INT32_MAX, "data.seed", d.seed, f"must be in [0, {INT32_MAX}]")
    _check(d.batch_size >= 0, "data.batch_size", d.batch_size, "must be >= 1, or 0 for full batch")
    if d.name == "teacher_student":
        for k in ("n_train", "n_test", "din", "dout", "teacher_hidden"):
            _check(getattr(d, k) >= 1, f"data.{k}", getattr(d, k), "must be >= 1")
        _check(d.noise >= 0 and math.isfinite(d.noise), "data.noise", d.noise, "must be a finite number >= 0")
    if d.name == "sparse_parity":
        for k in ("n_train", "n_test", "n_bits"):
            _check(getattr(d, k) >= 1, f"data.{k}", getattr(d, k), "must be >= 1")
        _check(1 <= d.k <= d.n_bits, "data.k", d.k, f"must satisfy 1 <= k <= data.n_bits = {d.n_bits}")
        # the training draws may cover every input (cheap to check: few bits; n_train <= 2^31 - 1, so n_bits <= 30
        # here, and 2**n_bits of a large n_bits is not computed: 2**(2^31 - 1) took 30 s)
        # (only where the data set fits this machine's memory: the data set's own size check refused it, and that
        # was read as "the training inputs are all 2^n_bits inputs"; one too large is refused by the size check)
        memory = physical_memory()
        if d.n_bits <= 30 and 2**d.n_bits <= d.n_train and (memory is None or data_bytes(d, "mlp")[0] <= memory):
            from ..data import sparse_parity

            try:
                sparse_parity(seed=d.seed, n_bits=d.n_bits, k=d.k, n_train=d.n_train, n_test=d.n_test)
            except ValueError:
                _check(False, "data.n_test", d.n_test,
                       f"the data.n_train = {d.n_train} training inputs drawn from data.seed = {d.seed} are all "
                       f"2^n_bits = {2**d.n_bits} inputs of data.n_bits = {d.n_bits}, so none is left to hold out "
                       f"for a test set; use fewer training examples or more bits")
    if d.name == "modular_arithmetic":
        _check(d.p >= 2, "data.p", d.p, "must be >= 2")
        _check(0 < d.train_fraction < 1, "data.train_fraction", d.train_fraction, "must be in (0, 1)")
        (n, n_te), total = split_sizes(d), d.p * d.p
        _check(n >= 1 and n_te >= 1, "data.train_fraction", d.train_fraction,
               f"splits the {total} pairs of data.p = {d.p} into {n} training and {n_te} test pairs; both "
               f"splits need at least one example: use a fraction in {_fraction_range(total)}"
               + (" (or a larger data.p)" if total < 16 else ""))
    if d.name == "digits":
        _check(0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction, "must be in (0, 1)")
        n_tr, n_te = split_sizes(d)
        _check(n_tr >= 1 and n_te >= 1, "data.test_fraction", d.test_fraction,
               f"splits the {DIGITS_SIZE} images into {n_tr} training and {n_te} test images; both splits need "
               f"at least one example: use a fraction in {_fraction_range(DIGITS_SIZE)}")
    n = train_size(d)
    _check(d.batch_size <= n, "data.batch_size", d.batch_size,
           f"larger than the training set ({n} examples of {d.name!r}); use <= {n}, or 0 for full batch")


def physical_memory() -> int | None:
    """This machine's physical memory in bytes (``None`` where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def data_bytes(d: DataSettings, model_name: str) -> tuple[int, str]:
    """About the peak host memory that building the data set ``d`` (for ``model_name``) takes, in bytes, and the
    key that sets its size (arithmetic only: no data is built).  Counts the float64 draws and the float32 copies
    :mod:`quotient_sgd.data` makes (as ``quotient_sgd.data``'s own check, ``peak_bytes``, counts them); the one-hot
    encoding of ``modular_arithmetic`` grows as ``p^3``."""
    count = "data.n_train" if d.n_train >= d.n_test else "data.n_test"
    n = d.n_train + d.n_test
    if d.name == "teacher_student":
        # (the key named is the larger of the example count and the widest per-example size: 768 examples of
        # data.din = 10^9 inputs were "use a smaller data.n_train")
        width = max(("data.din", d.din), ("data.dout", d.dout), ("data.teacher_hidden", d.teacher_hidden),
                    key=lambda kv: kv[1])
        # (and the teacher's weights, din x teacher_hidden and teacher_hidden x dout: data.din = data.teacher_hidden
        # = 10^5 with 2 examples validated, and the data set asked for 75 GiB)
        nbytes = n * (16 * d.din + 20 * d.dout + 16 * d.teacher_hidden) + 8 * d.teacher_hidden * (d.din + d.dout)
        return nbytes, (width[0] if width[1] > n else count)
    if d.name == "sparse_parity":
        return 20 * n * d.n_bits, ("data.n_bits" if d.n_bits > n else count)
    if d.name == "modular_arithmetic":
        pairs = d.p * d.p
        return (pairs * 24 * d.p if model_name != "transformer" else pairs * 80), "data.p"
    return 16 * DIGITS_SIZE * 65, "data.test_fraction"


def _check_data_size(d: DataSettings, model_name: str, memory: int | None = None) -> None:
    """A data set larger than this machine's memory (or with more examples than an int32 index reaches) is refused
    before anything is built: ``data.p = 50000`` asked for 10^15 bytes of one-hot inputs."""
    n_examples = sum(split_sizes(d))
    nbytes, key = data_bytes(d, model_name)
    value = getattr(d, key.split(".")[1])
    memory = physical_memory() if memory is None else memory
    if memory is not None and memory >= 0:  # (-1: not checked, a recorded config)
        _check(nbytes <= memory, key, value,
               f"makes a data set of {n_examples} examples that takes about {nbytes / 2**30:.3g} GiB to build, more "
               f"than this machine's {memory / 2**30:.3g} GiB of memory; use a smaller {key}"
               + (" (the one-hot inputs of an MLP grow as p^3; a transformer takes p^2 tokens)"
                  if d.name == "modular_arithmetic" and model_name != "transformer" else ""))
    if n_examples > INT32_MAX:  # (the key of the example count, not of a width)
        key = "data.p" if d.name == "modular_arithmetic" else "data.n_train" if d.n_train >= d.n_test else "data.n_test"
        _check(False, key, getattr(d, key.split(".")[1]), f"makes {n_examples} examples (train and test); at most "
               f"{INT32_MAX} are indexable (int32)")


#: The keys that set the size of each model; a model too large for memory is named by the one furthest above its
#: default (a Transformer of mlp_ratio = 10^8 by model.mlp_ratio, not by its d_model).
_SIZE_KEYS = {"mlp": ("hidden",), "deep_linear": ("hidden",), "meanfield": ("width",),
              "cnn": ("channels", "kernel_size"), "transformer": ("d_model", "mlp_ratio", "num_layers")}


def _size_key(m: ModelSettings) -> str:
    """The key of :data:`_SIZE_KEYS` of model ``m`` whose value is the largest multiple of its default."""
    default = ModelSettings()

    def ratio(k):
        big = lambda v: max(v, default=1) if isinstance(v, tuple) else v  # noqa: E731
        return big(getattr(m, k)) / max(big(getattr(default, k)), 1)

    return max(_SIZE_KEYS.get(m.name, ("hidden",)), key=ratio)


def _check_model_size(s: Settings, memory: int | None = None) -> None:
    """A model whose training state cannot fit in this machine's memory is refused before anything is built: its
    parameters, their gradient and the optimiser's state (SGD's momentum trace, Adam's two moments) in float32,
    a lower bound of what a step holds (``model.hidden = (100000, 100000)``, 10^10 parameters, 149 GiB, was
    accepted, and the run went on to initialise it)."""
    from ._build_check import num_params

    memory = physical_memory() if memory is None else memory
    if memory is None:
        return
    n = num_params(s.model, s.data)
    copies = 2 + (2 if s.optim.name in ("adam", "adamw") else 1)
    nbytes = 4 * n * copies
    key = _size_key(s.model)
    _check(nbytes <= memory, f"model.{key}", getattr(s.model, key),
           f"gives this {s.model.name} {n} parameters, whose training state (parameters, gradient and the "
           f"{s.optim.name} state: {copies} float32 copies) takes at least {nbytes / 2**30:.3g} GiB, more than this "
           f"machine's {memory / 2**30:.3g} GiB of memory; use a smaller model.{key}")
    width = _activation_width(s)
    n_eval = max(split_sizes(s.data))
    activations = 4 * n_eval * width
    if nbytes + activations > memory:
        # the evaluation at every chunk's end runs the whole training (and test) split through the model at once
        d = s.data
        count = ("data.p" if d.name == "modular_arithmetic" else None if d.name == "digits"
                 else "data.n_train" if d.n_train >= d.n_test else "data.n_test")
        akey = count if count is not None and n_eval > width else f"model.{key}"
        _check(False, akey, getattr(s.model if akey.startswith("model.") else d, akey.split(".")[1]),
               f"the evaluation at the end of every chunk runs the {n_eval} examples of a split through this "
               f"{s.model.name} at once, and its widest layer alone holds {width} float32 numbers an example: at "
               f"least {activations / 2**30:.3g} GiB (with the training state {(nbytes + activations) / 2**30:.3g} "
               f"GiB), more than this machine's {memory / 2**30:.3g} GiB of memory; use "
               + (f"a smaller {count} or " if count is not None else "") + f"a smaller model.{key}")
    ob = s.observables
    if ob.hessian_every > 0:
        # the Lanczos iteration keeps its lanczos_steps basis vectors (each as large as the parameters) and
        # diagonalises the lanczos_steps x lanczos_steps tridiagonal matrix as a dense one, with its eigenvectors
        # (jnp.linalg.eigh: the matrix and the vectors, at least; XLA:CPU took 24 bytes an entry): lanczos_steps =
        # 100000 on the 161-parameter tiny config validated and failed in the first chunk, "Out of memory
        # allocating 240001506024 bytes"
        m = ob.lanczos_steps
        lanczos = 4 * m * n + 8 * m * m
        _check(nbytes + lanczos <= memory, "observables.lanczos_steps", m,
               f"the Lanczos iteration of the Hessian extremes (observables.hessian_every = {ob.hessian_every}) keeps "
               f"{m} vectors of this {s.model.name}'s {n} parameters and diagonalises a {m} x {m} matrix: at least "
               f"{lanczos / 2**30:.3g} GiB (with the training state {(nbytes + lanczos) / 2**30:.3g} GiB), more than "
               f"this machine's {memory / 2**30:.3g} GiB of memory; use fewer observables.lanczos_steps (a Krylov "
               f"space has at most as many dimensions as the parameters: {n} here)")
    if s.observables.noise_every > 0:
        # the noise temperature takes the gradient of every example of the batch at once (jax.jacrev of the
        # per-example losses): one float32 copy of the parameters per example, beside the training state
        batch = s.data.batch_size or train_size(s.data)  # (a batch-size sweep is refused with the noise)
        per_example = 4 * n * batch
        _check(nbytes + per_example <= memory, "observables.per_example_grads", s.observables.per_example_grads,
               f"the gradient-noise temperature (observables.noise_every = {s.observables.noise_every}) takes the "
               f"gradients of the {batch} examples of a batch at once, {batch} float32 copies of this "
               f"{s.model.name}'s {n} parameters ({per_example / 2**30:.3g} GiB; with the training state at least "
               f"{(nbytes + per_example) / 2**30:.3g} GiB), more than this machine's {memory / 2**30:.3g} GiB of "
               f"memory; use a smaller data.batch_size, a smaller model.{key}, or observables.noise_every=0")


def _activation_width(s: Settings) -> int:
    """The float32 numbers an example puts in the configured model's widest layer output (a lower bound of what a
    forward pass holds per example): an MLP's widest hidden layer, a CNN's widest feature map (8 x 8 pixels, SAME
    padding, stride 1), a Transformer's widest of its MLP and attention per token position."""
    from ._build_check import input_spec

    m = s.model
    shape, dout, _ = input_spec(s)
    if m.name in ("mlp", "deep_linear"):
        return max((*m.hidden, dout))
    if m.name == "meanfield":
        return max(m.width, dout)
    if m.name == "cnn":
        return max(64 * max(m.channels, default=1), dout)
    seq = shape[0]
    return seq * max(m.d_model * m.mlp_ratio, m.num_heads * seq, dout)


def _check_model(m: ModelSettings, d: DataSettings) -> None:
    from ..models import ACTIVATIONS

    _check_choice("model.name", m.name, MODELS)
    _check_choice("model.activation", m.activation, sorted(ACTIVATIONS))
    if m.name in ("mlp", "deep_linear"):
        _check(all(h >= 1 for h in m.hidden), "model.hidden", m.hidden, "widths must be >= 1")
    if m.name == "cnn":
        _check(d.name == "digits", "model.name", m.name, f"a CNN needs image data: data.name='digits', got {d.name!r}")
        _check(len(m.channels) >= 1 and all(c >= 1 for c in m.channels), "model.channels", m.channels,
               "at least one conv layer, widths >= 1")
        _check(m.kernel_size >= 1, "model.kernel_size", m.kernel_size, "must be >= 1")
        _check_choice("model.norm", m.norm, ("none", "layer", "batch"))
        _check(m.norm != "layer" or min(m.channels) >= 3, "model.channels", m.channels,
               "model.norm='layer' needs at least 3 channels in every conv layer (a LayerNorm over one channel "
               "outputs its bias alone, so the output would not depend on the input; over two it outputs "
               "+-(scale_0, -scale_1) + bias, a function of one sign, so the layers before it get no gradient); "
               "use widths >= 3, or model.norm='batch' or 'none'")
    if m.name == "transformer":
        _check(d.name == "modular_arithmetic", "model.name", m.name,
               f"a Transformer reads token sequences: data.name='modular_arithmetic', got {d.name!r}")
        for k in ("d_model", "num_heads", "num_layers", "mlp_ratio"):
            _check(getattr(m, k) >= 1, f"model.{k}", getattr(m, k), "must be >= 1")
        _check(m.d_model >= 3, "model.d_model", m.d_model,
               "must be >= 3: every read of the residual stream goes through a LayerNorm over its d_model "
               "features; over one feature it outputs its bias alone (the logits would not depend on the "
               "tokens), over two +-(scale_0, -scale_1) + bias, a function of one sign, so the parameters "
               "before it get no gradient")
        _check(m.d_model % m.num_heads == 0, "model.num_heads", m.num_heads,
               f"must divide model.d_model = {m.d_model}")
    if m.name == "meanfield":
        _check(m.width >= 1, "model.width", m.width, "must be >= 1")


def _comma_hint(key: str, value: str) -> str:
    """For a name of a tuple-of-strings key holding commas (``--config.observables.names=loss,grad_norm`` is the
    one name ``'loss,grad_norm'``: unlike numbers, unquoted names are not split): how to write the tuple, else
    ``""`` (the hint was "did you mean 'loss,grad_norm' -> 'grad_norm'?")."""
    parts = [p.strip().strip("'\"") for p in str(value).strip("()[] ").split(",") if p.strip()]
    if "," not in str(value) or len(parts) < 2:
        return ""
    return (f" ({value!r} is one name holding commas: quote each name of the tuple, e.g. "
            f"--config.{key}=\"{tuple(parts)!r}\")")


def _batch_norm(s: Settings) -> bool:
    return s.model.name == "cnn" and s.model.norm == "batch"


def _check_symmetry(s: Settings) -> None:
    from ..optim import DEFAULT_OBSERVABLES
    from ._build_check import component_names, selected_components

    sym, ob = s.symmetry, s.observables
    _check_choice("symmetry.mode", sym.mode, SYMMETRY_MODES)
    _check(sym.gauge_fix_every >= 1, "symmetry.gauge_fix_every", sym.gauge_fix_every, "must be >= 1")
    names = component_names(s)
    selected = selected_components(s)
    kinds = sorted({n.split("/")[0] for n in names})
    _check(bool(sym.components) or not sym.enabled, "symmetry.components", sym.components,
           f"selects no component of this {s.model.name} (it has the kinds {kinds} and the components {names}); "
           f"use ('all',), kinds or component names, or symmetry.enabled=False for a run without the group")
    for c in sym.components:
        ok = c == "all" or c in names or c in kinds
        close = [] if ok else difflib.get_close_matches(c, ["all", *kinds, *names], n=1)
        _check(ok, "symmetry.components", sym.components,
               f"{c!r} is not a symmetry of this {s.model.name} (activation {s.model.activation!r}); it has the "
               f"kinds {kinds} and the components {names}; use 'all', a kind or a component name"
               + (_comma_hint("symmetry.components", c) or (f" (did you mean {close[0]!r}?)" if close else "")))
    dup = sorted({c for c in sym.components if sym.components.count(c) > 1})
    _check(not dup, "symmetry.components", sym.components,
           f"repeats {dup}: each component is selected once; list each name once (allowed: 'all', the kinds "
           f"{kinds} or the components {names} of this {s.model.name})")
    if not sym.enabled:
        _check(sym.mode == "observe", "symmetry.mode", sym.mode, "needs symmetry.enabled=True")
    elif selected and sym.mode == "horizontal" and not any(cont for _, cont in selected):
        # (a tanh or GELU MLP has permutations only: the run was the 'observe' run, bit for bit, recorded as
        # 'horizontal')
        _check(False, "symmetry.mode", sym.mode,
               f"projects the updates off the orbits of the continuous symmetries, and the selected "
               f"symmetry.components = {sym.components} of this {s.model.name} (activation {s.model.activation!r}) "
               f"have none (selected: {[n for n, _ in selected]}; the model's components: {names}): the projection "
               f"is the identity and the run would be the 'observe' run; use symmetry.mode='observe', or select a "
               f"continuous component (rescale, scale, translation, gl)")
    elif not selected:  # a model without symmetries (an MLP with model.hidden=()): the run has no group
        why = (f"this {s.model.name} declares no symmetry (its components: {names}), so the run has no group")
        _check(sym.mode == "observe", "symmetry.mode", sym.mode,
               f"{why} to project on or fix the gauge of; use symmetry.mode='observe'")
        for k in ("hessian_every", "noise_every"):
            _check(getattr(ob, k) <= 0, f"observables.{k}", getattr(ob, k),
                   f"{why} and records the loss only; use observables.{k}=0")
    bad = [n for n in ob.names if n not in DEFAULT_OBSERVABLES]
    close = {b: difflib.get_close_matches(b, list(DEFAULT_OBSERVABLES), n=1) for b in bad}
    hint = ", ".join(f"{b!r} -> {c[0]!r}" for b, c in close.items() if c)
    comma = next((h for h in (_comma_hint("observables.names", b) for b in bad) if h), "")
    _check(not bad, "observables.names", ob.names, f"unknown {bad}; allowed: {list(DEFAULT_OBSERVABLES)}"
           + (comma or (f" (did you mean {hint}?)" if hint else "")))
    dup = sorted({n for n in ob.names if ob.names.count(n) > 1})
    _check(not dup, "observables.names", ob.names,
           f"repeats {dup}: each observable is recorded once; list each name once (allowed: a selection of "
           f"{list(DEFAULT_OBSERVABLES)})")
    extra = [n for n in ob.names if n != "loss"]
    _check(not extra or bool(selected), "observables.names", ob.names,
           f"{extra} are recorded with the symmetry group, and this run has none ("
           + ("symmetry.enabled=False" if not sym.enabled else f"this {s.model.name} declares no symmetry")
           + "): it records the loss only; use observables.names=() or ('loss',)")
    _check_choice("observables.curvature_batch", ob.curvature_batch, CURVATURE_BATCHES)
    for k in ("every", "hessian_k", "lanczos_steps"):
        _check(getattr(ob, k) >= 1, f"observables.{k}", getattr(ob, k), "must be >= 1")
    for k in ("hessian_every", "noise_every"):
        _check(getattr(ob, k) >= 0, f"observables.{k}", getattr(ob, k), "must be >= 0 (0: off)")
    _check(ob.hessian_every == 0 or ob.hessian_k <= ob.lanczos_steps, "observables.hessian_k", ob.hessian_k,
           f"Lanczos finds at most as many extreme eigenvalues as it takes steps: must be <= "
           f"observables.lanczos_steps = {ob.lanczos_steps} (or raise lanczos_steps)")
    if ob.hessian_every and ob.hessian_k > 1 and selected:  # (one extreme always exists)
        from ._build_check import parameter_dimensions

        n_params, n_gen = parameter_dimensions(s)
        dim = max(n_params - n_gen, 1)
        _check(ob.hessian_k <= dim, "observables.hessian_k", ob.hessian_k,
               f"the quotient Hessian acts on the {dim}-dimensional horizontal space of this {s.model.name} "
               f"({n_params} parameters less {n_gen} symmetry directions), which has at most {dim} eigenvalues at "
               f"each end (more are spurious Lanczos values); use observables.hessian_k <= {dim}")
    _check(ob.noise_every == 0 or ob.per_example_grads, "observables.noise_every", ob.noise_every,
           "the gradient-noise temperature needs per-example gradients: set observables.per_example_grads=True "
           "or observables.noise_every=0")
    batch = s.data.batch_size or train_size(s.data)
    _check(ob.noise_every == 0 or batch >= 2, "observables.noise_every", ob.noise_every,
           f"the gradient-noise temperature is a sample variance over the examples of a batch, and this run's "
           f"batches hold {batch} (data.batch_size = {s.data.batch_size}"
           + (f", full batch of {batch} training examples" if not s.data.batch_size else "")
           + "): it would be NaN at every step; use batches of at least 2 examples, or observables.noise_every=0")
    _check(not (ob.per_example_grads and _batch_norm(s)), "observables.per_example_grads", ob.per_example_grads,
           "per-example gradients are not defined with model.norm='batch': every example's loss depends on the "
           "whole batch through the batch statistics; use model.norm='layer' or 'none', or per_example_grads=False")
    _check(ob.noise_every == 0 or sym.enabled, "observables.noise_every", ob.noise_every,
           "needs symmetry.enabled=True (the noise is measured on the horizontal space)")
    _check(ob.hessian_every == 0 or sym.enabled, "observables.hessian_every", ob.hessian_every,
           "needs symmetry.enabled=True")
    _check(s.init_gauge >= 0 and math.isfinite(s.init_gauge), "init_gauge", s.init_gauge,
           "must be a finite number >= 0 (0: no re-gauging)")
    _check(s.init_gauge == 0 or sym.enabled, "init_gauge", s.init_gauge, "needs symmetry.enabled=True")
    gauges = [("init_gauge", s.init_gauge, s.init_gauge)] + [("sweep.init_gauge", s.sweep.init_gauge, v)
                                                            for v in s.sweep.init_gauge]
    for key, value, g in gauges:
        _check(g == 0 or not sym.enabled or any(cont for _, cont in selected), key, value,
               f"re-gauging moves the parameters by a continuous symmetry, and the selected symmetry.components = "
               f"{sym.components} of this {s.model.name} (activation {s.model.activation!r}) have none (selected: "
               f"{[n for n, _ in selected]}; the model's components: {names}); use 0, or select a continuous "
               f"component (rescale, scale, translation, gl)")
    _check_canonical_section(s, selected)


#: Observables evaluated at the canonical representative (``quotient_sgd.optim.quotient_trajectory``).
_CANONICAL_OBSERVABLES = ("grad_norm_canonical", "effective_lr", "invariant_norms")


def _canonical_users(s: Settings) -> list[str]:
    """What the configured run evaluates at the canonical representative of the parameters' orbit."""
    from ..optim import DEFAULT_OBSERVABLES

    names = tuple(s.observables.names) or DEFAULT_OBSERVABLES
    out = [f"observable {n!r}" for n in _CANONICAL_OBSERVABLES if n in names]
    curv = [n for n in ("curvature", "shock_number", "fold_number") if n in names]
    if curv and (s.symmetry.mode != "observe" or s.optim.name != "sgd"):
        why = f"symmetry.mode={s.symmetry.mode!r}" if s.symmetry.mode != "observe" else f"optim.name={s.optim.name!r}"
        out.append(f"observables {curv} with {why} (their learning rate is then the effective one, measured at the "
                   f"canonical representative)")
    if s.observables.hessian_every > 0:
        out.append(f"observables.hessian_every = {s.observables.hessian_every} (the quotient Hessian is taken at the "
                   f"canonical representative)")
    if s.symmetry.mode == "gauge_fix":
        out.append("symmetry.mode = 'gauge_fix'")
    return out


def _check_canonical_section(s: Settings, selected: list[tuple[str, bool]]) -> None:
    """A deep linear stack has a canonical representative only where its GL chain is minimal (every inner width
    equal and at most the chain's input and output widths: then the end-to-end product determines the orbit).
    A run that needs one (see :func:`_canonical_users`) on a stack that is not minimal is refused."""
    if s.model.name != "deep_linear" or not selected:
        return
    users = _canonical_users(s)
    if not users:
        return
    from ._build_check import input_spec

    shape, dout, _ = input_spec(s)
    sizes = (math.prod(shape), *s.model.hidden, dout)
    bonds = sorted(int(n.rsplit(".", 1)[1]) for n, _ in selected if n.startswith("gl/layers."))
    runs: list[list[int]] = []
    for l in bonds:  # consecutive bonds share a kernel: one chain
        if runs and runs[-1][-1] == l - 1:
            runs[-1].append(l)
        else:
            runs.append([l])
    for r in runs:
        a, b = r[0], r[-1]
        din, inner, out = sizes[a], sizes[a + 1:b + 2], sizes[b + 2]
        m = min(din, out)
        if len(set(inner)) == 1 and inner[0] <= m:
            continue
        chain = [f"gl/layers.{l}" for l in r]
        raise _err("model.hidden", s.model.hidden,
                   f"the deep linear GL chain {chain} (input width {din}, inner widths {list(inner)}, output width "
                   f"{out}) is not minimal: a canonical representative of its orbit exists only for minimal chains, "
                   f"all inner widths equal and at most min(input, output) = {m} (e.g. model.hidden = "
                   f"{tuple([m] * len(s.model.hidden))}), and this run needs one for: {'; '.join(users)}. Use such "
                   f"widths, or only what needs no canonical representative (e.g. observables.names = ('loss', "
                   f"'grad_norm', 'charges', 'charge_drift', 'update_horizontal_norm'), observables.hessian_every = "
                   f"0, symmetry.mode 'observe' or 'horizontal')")


def _check_optim(s: Settings) -> None:
    o = s.optim
    _check_choice("optim.name", o.name, OPTIMIZERS)
    _check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", o.lr, "must be a finite number > 0")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _check(o.weight_decay >= 0 and math.isfinite(o.weight_decay), "optim.weight_decay", o.weight_decay,
           "must be a finite number >= 0")
    _check(o.clip_norm >= 0 and math.isfinite(o.clip_norm), "optim.clip_norm", o.clip_norm,
           "must be a finite number >= 0 (0: no clipping)")
    _check(0 <= o.b1 < 1, "optim.b1", o.b1, "must be in [0, 1)")
    _check(0 <= o.b2 < 1, "optim.b2", o.b2, "must be in [0, 1)")
    _check(o.eps > 0 and math.isfinite(o.eps), "optim.eps", o.eps, "must be a finite number > 0")
    _check(o.name != "adam" or o.weight_decay == 0, "optim.weight_decay", o.weight_decay,
           "optim.name='adam' has no weight decay; use optim.name='adamw'")
    _check(o.name != "adam" or not s.sweep.weight_decay, "sweep.weight_decay", s.sweep.weight_decay,
           "optim.name='adam' has no weight decay; use optim.name='adamw'")
    _check(o.name == "sgd" or o.momentum == 0, "optim.momentum", o.momentum,
           f"only for optim.name='sgd' ({o.name!r} has b1/b2)")
    _check(o.name == "sgd" or not o.nesterov, "optim.nesterov", o.nesterov,
           f"only for optim.name='sgd' ({o.name!r} has no Nesterov variant here); use optim.nesterov=False")


def _check_members(sw, axis: str, ok, allowed: str) -> None:
    """Every value of the sweep axis ``sweep.<axis>`` passes ``ok``, or a ConfigError naming the axis, its list,
    what is allowed and the first member value that is not (with its position in the list)."""
    values = getattr(sw, axis)
    for i, v in enumerate(values):
        _check(ok(v), f"sweep.{axis}", values, f"{allowed}; sweep.{axis}[{i}] = {v!r} is not")


def setting(s: Settings, key: str):
    """The value of the dotted ``key`` (``"optim.lr"``, ``"steps"``) in ``s``."""
    return functools.reduce(getattr, key.split("."), s)


def _f32(v: float) -> float:
    """``v`` as the float32 the compiled programs compute with (``inf`` beyond its range, 0 below it)."""
    with np.errstate(over="ignore", under="ignore"):
        return float(np.float32(v))


def _as_run(v):
    """A sweep value as the member runs with it: floats (learning rates, decays, momenta, gauges) are float32
    inputs of the compiled programs, so ``0.1`` and ``0.1 + 1e-12`` are one member."""
    return _f32(v) if isinstance(v, float) else v


#: The float settings the programs take as float32, and what each must stay there: ``"positive"`` (> 0),
#: ``"off_or_positive"`` (0, its "off", or > 0: a clipping norm of ``1e-50`` is 0 in float32 and clipped every update
#: to nothing), ``"finite"``, or ``"below_one"`` (a decay in [0, 1): ``optim.b2 = 0.99999999`` is 1.0 in float32,
#: where Adam's bias correction ``1 - b2^t`` is 0 and every update was 0, the run silently not training; ``b1``
#: made the updates infinite, ``momentum`` a trace that never decays).
_FLOAT32_KEYS = {"optim.lr": "positive", "optim.eps": "positive", "optim.weight_decay": "finite",
                 "optim.clip_norm": "off_or_positive", "optim.momentum": "below_one", "optim.b1": "below_one",
                 "optim.b2": "below_one", "init_gauge": "finite", "sweep.lr": "positive",
                 "sweep.weight_decay": "finite", "sweep.init_gauge": "finite", "sweep.momentum": "below_one",
                 "data.noise": "finite"}


def _check_float32(s: Settings) -> None:
    """Every float setting that the programs take as float32 stays what validation allowed there: finite, > 0
    where it must be (``optim.lr = 1e39`` validated as a finite number > 0 and ran with an infinite learning
    rate; ``1e-50`` ran with 0), and below 1 for a decay (:data:`_FLOAT32_KEYS`)."""
    tiny, big = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
    below_one = float(np.nextafter(np.float32(1), np.float32(0)))
    for key, need in _FLOAT32_KEYS.items():
        obj = setting(s, key)
        for i, v in enumerate(obj if isinstance(obj, tuple) else (obj,)):
            x = _f32(v)
            if math.isfinite(x) and {"positive": x >= tiny, "off_or_positive": v == 0 or x >= tiny,
                                     "finite": True, "below_one": x < 1}[need]:
                continue
            where = f"; {key}[{i}] = {v!r} is not" if isinstance(obj, tuple) else ""
            allowed = {"positive": f"values in [{tiny:.3g}, {big:.3g}]",
                       "off_or_positive": f"0 (off) or values in [{tiny:.3g}, {big:.3g}]",
                       "finite": f"values <= {big:.3g}",
                       "below_one": f"values in [0, {below_one!r}] (the largest float32 below 1)"}[need]
            raise _err(key, obj, f"the programs compute in float32, where {v!r} is {x!r}: use {allowed}{where}")


def _repeats(values: list, convert) -> tuple[list, str]:
    """``(the values that occur more than once, a note)``, values compared as the members run with them
    (``convert``: one function per element of the tuples of ``values``, or a 1-tuple for plain values); counted in
    one pass (``list.count`` per value was quadratic: 20000 seeds took 12 s, 20000 zipped pairs 40 s).  The note
    says when distinct values collide only as run."""
    import collections

    key = ((lambda v: tuple(f(x) for f, x in zip(convert, v))) if values and isinstance(values[0], tuple)
           else convert[0])
    groups: dict = collections.defaultdict(list)
    for v in values:
        groups[key(v)].append(v)
    dup = sorted({v for g in groups.values() if len(g) > 1 for v in g})
    rounded = any(len(set(g)) > 1 for g in groups.values())
    return dup, (" (distinct values that are the same float32 number, the value a member runs with)" if rounded
                 else "")


def _check_sweep(s: Settings) -> None:
    sw = s.sweep
    _check_choice("sweep.mode", sw.mode, SWEEP_MODES)
    _check(sw.members_per_device >= 0, "sweep.members_per_device", sw.members_per_device,
           "must be >= 0 (0: chosen from the measured cost)")
    axes = sw.axes()
    if sw.mode == "zip" and axes:
        lens = {a: len(v) for a, v in axes.items()}
        _check(len(set(lens.values())) == 1, "sweep.mode", sw.mode, f"zip needs equally long lists, got {lens}")
    for a, vals in axes.items():
        dup, rounded = _repeats(vals, (_as_run,))
        _check(sw.mode != "product" or not dup, f"sweep.{a}", vals,
               f"repeats {dup}{rounded}: the product would run identical members; list each value once")
    if sw.mode == "zip" and axes:
        dup, rounded = _repeats(list(zip(*axes.values())), [_as_run] * len(axes))
        _check(not dup, "sweep.mode", sw.mode,
               f"zip pairs {list(axes)} repeat the member(s) {dup}{rounded}: identical members; make every member "
               f"distinct")
    n = train_size(s.data)
    _check_members(sw, "lr", lambda v: v > 0 and math.isfinite(v), "every value must be a finite number > 0")
    _check_members(sw, "batch_size", lambda v: 1 <= v <= n,
                   f"every value must be in [1, {n}] (the training set of {s.data.name!r})")
    _check(not sw.batch_size or s.data.batch_size > 0, "sweep.batch_size", sw.batch_size,
           f"cannot sweep the batch size of a full-batch run (data.batch_size=0); set data.batch_size to a batch "
           f"size (e.g. --config.data.batch_size={max(sw.batch_size or (1,))}: the sweep's values replace it), or "
           f"empty sweep.batch_size")
    _check(not sw.batch_size or not _batch_norm(s), "sweep.batch_size", sw.batch_size,
           "a batch-size sweep runs every member on the largest batch with a 0/1 mask, and the masked examples "
           "would enter the batch statistics of model.norm='batch'; sweep the other axes and run one sweep per "
           "batch size (or use model.norm='layer')")
    _check(not sw.batch_size or s.observables.noise_every == 0, "sweep.batch_size", sw.batch_size,
           f"a batch-size sweep runs every member on the largest batch with a 0/1 mask, and the gradient-noise "
           f"temperature (observables.noise_every = {s.observables.noise_every}) would be measured over the whole "
           f"padded batch, not the member's; run one sweep per batch size, or set observables.noise_every=0")
    _check_members(sw, "seed", lambda v: INT32_MIN <= v <= INT32_MAX,
                   f"every value must be an int32, in [{INT32_MIN}, {INT32_MAX}]")
    _check_members(sw, "weight_decay", lambda v: v >= 0 and math.isfinite(v),
                   "every value must be a finite number >= 0")
    _check_members(sw, "momentum", lambda v: 0 <= v < 1, "every value must be in [0, 1)")
    _check(not sw.momentum or s.optim.name == "sgd", "sweep.momentum", sw.momentum, "only for optim.name='sgd'")
    _check_members(sw, "init_gauge", lambda v: v >= 0 and math.isfinite(v),
                   "every value must be a finite number >= 0")
    _check(not sw.init_gauge or s.symmetry.enabled, "sweep.init_gauge", sw.init_gauge, "needs symmetry.enabled")


def _check_noise_full_batch(s: Settings) -> None:
    """The gradient-noise temperature ``T = eta sigma^2 / (2B)`` is that of SGD's mini-batch noise (THEORY section
    3: SGD with batch size ``B`` behaves like Langevin dynamics at temperature ``T``).  A full-batch run (``data.
    batch_size = 0``, or the whole training set: the runner draws distinct examples, so every step's batch holds
    them all) takes plain gradient-descent steps, which have no gradient noise; the formula still gave a nonzero
    ``T`` (and viscosity ``T / 2``) from the spread of the per-example gradients.  Left out for a recorded config
    (:func:`from_dict`), so that a run made before this check can still be reported."""
    ob, d = s.observables, s.data
    n = train_size(d)
    if ob.noise_every == 0 or (d.batch_size and d.batch_size < n):
        return
    what = ("0: full batch" if not d.batch_size else "the whole training set") + f", all {n} training examples"
    use = (f"use a mini-batch (data.batch_size in [2, {n - 1}])" if n >= 3 else
           "use a training set of at least 3 examples and a data.batch_size of at least 2 below its size")
    _check(False, "observables.noise_every", ob.noise_every,
           f"the gradient-noise temperature T = eta sigma^2 / (2B) is the temperature of SGD's mini-batch noise, and "
           f"this run's data.batch_size = {d.batch_size} ({what}) takes plain gradient-descent steps, which have no "
           f"gradient noise: T (and the viscosity T / 2) would be nonzero where the dynamics has none; {use}, or set "
           f"observables.noise_every=0")


def _check_int32(s: Settings) -> None:
    """Every integer setting (and every element of an integer tuple) at most ``INT32_MAX``: step counts, periods,
    sizes and seeds are int32 in the compiled programs, and a larger value failed there with an OverflowError
    after the run had started."""
    for sect in (None, *SECTIONS):
        obj = s if sect is None else getattr(s, sect)
        for f in dataclasses.fields(obj):
            if sect is None and f.name in SECTIONS:
                continue
            key = f.name if sect is None else f"{sect}.{f.name}"
            value = getattr(obj, f.name)
            items = value if isinstance(value, tuple) else (value,)
            for v in items:
                if isinstance(v, int) and not isinstance(v, bool) and v > INT32_MAX:
                    raise _err(key, value, f"must be <= {INT32_MAX} (integer settings are int32 in the compiled "
                                           f"programs)")


def validate(cfg: Mapping[str, Any] | Any, *, check_memory: bool = True) -> Settings:
    """``ConfigDict`` (or nested dict) -> :class:`Settings`, or :class:`ConfigError` naming the key, the value
    and what is allowed.  Pure: nothing is computed on device and nothing is written.  ``check_memory=False``
    leaves out the checks against this machine's memory (a data set, a model, its per-example gradients, Lanczos
    vectors or evaluation too large for it), of float settings against float32's range and of the noise
    temperature of a full-batch run (:func:`_check_noise_full_batch`): a recorded config is read with it
    (:func:`from_dict`), so that a run made on a larger machine (or by a version that let such a value pass) can be
    reported here."""
    if not (isinstance(cfg, Mapping) or hasattr(cfg, "to_dict")):
        raise ConfigError(f"config = {cfg!r}: expected a ConfigDict or a dict of the run sections "
                          f"{sorted(SECTIONS)}, got {type(cfg).__name__} (get_config() returns the ConfigDict of "
                          f"quotient_sgd.config.default_config(), changed where the run differs)")
    values = _to_plain(cfg)
    top = {f.name: f for f in dataclasses.fields(Settings)}
    kwargs: dict[str, Any] = {}
    for k, v in values.items():
        if k not in top:
            close = _close_key(k, top)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            # (a run section is a mapping: configs/hj_slices.py has a tuple `model` of experiment overrides)
            if not any(isinstance(values.get(sect), Mapping) or callable(getattr(values.get(sect), "to_dict", None))
                       for sect in SECTIONS):
                hint += (f"; this config has none of the run sections {sorted(SECTIONS)}: it is not a run config "
                         "(the experiment configs in configs/ run with `python experiments/<name>.py`)")
            raise ConfigError(f"config.{k}: unknown key{hint}; allowed top-level keys: {sorted(top)}")
        if k in SECTIONS:
            kwargs[k] = _section(k, SECTIONS[k], v)
        else:
            kwargs[k] = _typed(k, v, top[k].default)
    s = Settings(**kwargs)
    _check_int32(s)
    _check(bool(s.name.strip()) and "/" not in s.name and "\0" not in s.name and s.name not in (".", ".."), "name",
           s.name, "a non-blank run name without '/' or NUL characters, other than '.' and '..' (it names the "
           "default run directory runs/<name>)")
    _check(s.steps >= 1, "steps", s.steps, "must be >= 1")
    _check(INT32_MIN <= s.seed <= INT32_MAX, "seed", s.seed, f"must be an int32, in [{INT32_MIN}, {INT32_MAX}]")
    _check(s.checkpoint.every >= 1, "checkpoint.every", s.checkpoint.every, "must be >= 1")
    _check(s.checkpoint.keep >= 1, "checkpoint.keep", s.checkpoint.keep, "must be >= 1")
    _check(s.logging.every >= 1, "logging.every", s.logging.every, "must be >= 1")
    _check_data(s.data)
    _check_model(s.model, s.data)
    _check_data_size(s.data, s.model.name, None if check_memory else -1)
    _check_optim(s)
    if check_memory:
        _check_model_size(s)
    _check_symmetry(s)
    _check_sweep(s)
    if check_memory:  # (a recorded config ran with what it held: it is reported as it is)
        _check_float32(s)
        _check_noise_full_batch(s)
    return s


def from_dict(d: Mapping[str, Any]) -> Settings:
    """Re-validate a resolved ``config.json`` (a recorded config: what this machine's memory allows is not
    checked, see :func:`validate`'s ``check_memory``)."""
    return validate(d, check_memory=False)


def _kind(default: Any) -> str:
    """What a schema field holds, in words (for messages)."""
    if isinstance(default, bool):
        return "a bool"
    return {int: "an int", float: "a float", str: "a string", tuple: "a tuple"}.get(type(default), "a value")


#: A number as written on the command line (absl reads ``1`` / ``0`` given to a bool flag as ``True`` / ``False``).
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _check_override_bool(key: str, raw: Any, default: Any) -> None:
    """:class:`ConfigError` for a number given to a bool key (``--config.symmetry.enabled=1``): absl would read it
    as ``True``, and validation would no longer see the number, which a bool key never takes."""
    if isinstance(default, bool) and isinstance(raw, str) and _NUMBER.fullmatch(raw.strip()):
        raise _err(key, raw, f"expected a bool (True/False), got a number; write --config.{key}=True or "
                             f"--config.{key}=False")


def check_override_key(key: str, raw: Any) -> None:
    """:class:`ConfigError` when the dotted ``key`` of a ``--config.<key>=<raw>`` override is not a key of the
    schema, or is a bool key given a number (``--config.logging.plots=0``): the message names the key, the value
    and what is allowed at that level (as :func:`validate` does for a config file)."""
    parts = key.split(".")
    top = {f.name: f for f in dataclasses.fields(Settings)}

    def unknown(k: str, allowed: list[str], level: str) -> ConfigError:
        close = _close_key(k, allowed)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ConfigError(f"config.{key} = {raw}: unknown key{hint}; allowed {level}: {sorted(allowed)}")

    if parts[0] not in top:
        raise unknown(parts[0], list(top), "top-level keys")
    if parts[0] in SECTIONS:
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[parts[0]])}
        if len(parts) == 1:
            if isinstance(raw, str) and not raw.strip().startswith("{"):  # (a dict literal replaces the section)
                # (ml_collections: "Failed to parse 'mlp' as a ConfigDict: ValueError('malformed node or string on
                # line 1: <ast.Name object at 0x...>')")
                example = (f"--config.{key}.name={raw}" if "name" in fields and raw.strip()
                           else f"--config.{key}.{next(iter(fields))}=VALUE")
                raise ConfigError(f"config.{key} = {raw}: config.{key} is a section, not a key; set one of its keys, "
                                  f"e.g. {example} (keys of config.{key}: {sorted(fields)})")
            return
        if parts[1] not in fields:
            raise unknown(parts[1], list(fields), f"keys of config.{parts[0]}")
        if len(parts) > 2:
            leaf = f"config.{parts[0]}.{parts[1]}"
            raise ConfigError(f"config.{key} = {raw}: {leaf} is {_kind(fields[parts[1]].default)}, not a section; "
                              f"set it as --{leaf}=VALUE")
        _check_override_bool(key, raw, fields[parts[1]].default)
        return
    if len(parts) > 1:
        raise ConfigError(f"config.{key} = {raw}: config.{parts[0]} is {_kind(top[parts[0]].default)}, not a "
                          f"section; set it as --config.{parts[0]}=VALUE")
    _check_override_bool(key, raw, top[parts[0]].default)


#: The directories of the config files loaded in this process (:func:`config_dir_on_path`), oldest first.
_CONFIG_DIRS: list[str] = []
#: Those of them that :func:`config_dir_on_path` appended to ``sys.path`` (the others were on it already).
_APPENDED_DIRS: list[str] = []
#: The modules that loading a config file imported from beside it (``{module name: its directory}``).
_BESIDE_CONFIGS: dict[str, str] = {}


def config_dir_on_path(path: str) -> None:
    """Put the directory of the config file ``path`` on ``sys.path`` (appended, once), so that the file can import
    the modules beside it (``from base import get_config``) whatever the working directory and however the
    command was started, as ``python path`` would let it; appended, it shadows no installed module.  Among the
    directories appended for the config files loaded before, it is moved first: a module beside ``path`` is found
    there, not beside another config file of the same process (see :func:`_modules_beside`).  A directory that was on
    ``sys.path`` already keeps its place, and none is moved before one that was (a config directory at the front,
    e.g. a script's own, would otherwise have carried the next one before the installed packages)."""
    import sys

    d = os.path.dirname(os.path.abspath(path))
    if d not in _CONFIG_DIRS:
        _CONFIG_DIRS.append(d)
    if d not in sys.path:
        sys.path.append(d)
        _APPENDED_DIRS.append(d)
    if d not in _APPENDED_DIRS:
        return
    others = [i for i, entry in enumerate(sys.path) if entry in _APPENDED_DIRS and entry != d]
    if others and sys.path.index(d) > others[0]:
        sys.path.remove(d)
        sys.path.insert(others[0], d)


@contextlib.contextmanager
def _modules_beside(path: str):
    """While the block loads the config file ``path``: its directory is searched first among those of the config
    files loaded before (:func:`config_dir_on_path`), and the modules an earlier load imported from beside a config
    file are imported again (they leave ``sys.modules``), so that ``from common import base`` in ``B/exp.py``
    reads ``B/common.py``.  (``load_config("B/exp.py")`` after ``load_config("A/exp.py")``, each importing its own
    ``common.py``, returned A's config: the module cached by the first load, found first on the path.)  The
    modules the block imports from directly beside a config file are recorded for the next load."""
    import sys

    config_dir_on_path(path)
    for name, d in list(_BESIDE_CONFIGS.items()):
        if _beside(sys.modules.get(name)) == d:
            for sub in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[sub]
        del _BESIDE_CONFIGS[name]
    before = set(sys.modules)
    try:
        yield
    finally:
        for name in set(sys.modules) - before:
            d = _beside(sys.modules.get(name))
            if d in _CONFIG_DIRS and "." not in name:
                _BESIDE_CONFIGS[name] = d


def _beside(module) -> str | None:
    """The directory holding the module ``module`` (``DIR/name.py``) or its package (``DIR/name/__init__.py``)."""
    file = getattr(module, "__file__", None)
    if not isinstance(file, str):
        return None
    file = os.path.abspath(file)
    if os.path.basename(file).startswith("__init__."):
        file = os.path.dirname(file)
    return os.path.dirname(file)


def config_module(path: str):
    """The config file ``path`` imported as a module (its top level run; the modules beside it importable,
    :func:`config_dir_on_path`, and read from beside it, :func:`_modules_beside`)."""
    with _modules_beside(path):
        # the source loader reads any file name (a config without the .py suffix: spec_from_file_location returns
        # None)
        loader = importlib.machinery.SourceFileLoader(f"_qsgd_config_{abs(hash(path))}", path)
        spec = importlib.util.spec_from_loader(loader.name, loader)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None):
    """Import ``path`` (a ``configs/<name>.py`` with ``get_config()``), apply ``{"optim.lr": 0.05}``-style
    overrides, and return the ConfigDict (validate it with :func:`validate`).  A ``bool`` assigned to a numeric key
    meanwhile raises a ``TypeError``, also in a plain ``ml_collections.ConfigDict``
    (:func:`~quotient_sgd.config._configdict.refuse_bool_numbers`); an override of an unknown key, of the wrong
    type, below a key that is no section, or of a whole section with a value raises :class:`ConfigError` naming the
    dotted key, the value and what it takes.  So does a ``path`` that is a directory or does not exist, a file whose
    ``get_config`` cannot be called without arguments (it failed in a bare ``TypeError: get_config() missing 1
    required positional argument``, naming no file), and overrides of a config that is no ``ConfigDict`` (a
    ``get_config()`` returning ``None``: "config.steps = 3: config. is a value, not a section; set it as config.");
    without overrides such a config is returned as it is (:func:`validate` refuses it)."""
    path = os.fspath(path)
    if os.path.isdir(path):  # (it was said "not to exist")
        raise ConfigError(f"config file {path!r} is a directory; give a file defining get_config(), e.g. "
                          f"configs/tiny.py")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    from ._configdict import refuse_bool_numbers

    with refuse_bool_numbers(), _modules_beside(path):  # (a plain ConfigDict would store `lr = True` as 1.0)
        mod = config_module(path)
        if not hasattr(mod, "get_config"):
            raise ConfigError(f"config file {path!r} defines no get_config()")
        _require_no_arguments(path, mod.get_config)
        cfg = mod.get_config()
        if overrides and not hasattr(cfg, "keys"):
            raise ConfigError(f"cannot load the config file {path!r}: get_config() returned {cfg!r} "
                              f"({type(cfg).__name__}), not a ConfigDict, which the overrides {sorted(overrides)} "
                              f"would set keys of; return the config (start from "
                              f"quotient_sgd.config.default_config())")
        for key, value in (overrides or {}).items():
            node = cfg
            parts = key.split(".")
            for depth, p in enumerate(parts[:-1]):
                if not hasattr(node, "keys"):  # ({"optim.lr.x": 1} failed in "argument of type 'float' is not
                    above = ".".join(parts[:depth])  # iterable")
                    raise ConfigError(f"config.{key} = {value!r}: config.{above} is {_kind(node)}, not a section; "
                                      f"set it as config.{above}")
                if p not in node:
                    if depth == 0:
                        raise ConfigError(missing_key_text(p, node))
                    raise ConfigError(f"config.{key}: unknown section {p!r}")
                node = node[p]
            if not hasattr(node, "keys"):
                above = ".".join(parts[:-1])
                raise ConfigError(f"config.{key} = {value!r}: config.{above} is {_kind(node)}, not a section; set it "
                                  f"as config.{above}")
            if parts[-1] not in node:
                raise ConfigError(missing_key_text(key, node))
            try:
                node[parts[-1]] = value
            except TypeError:  # (ml_collections named the last part only: "Could not override field 'lr' ...")
                current = node[parts[-1]]
                too_large = float_overflow(value) if isinstance(current, float) else None
                if too_large is not None:  # (10**5000: its repr below failed in a bare ValueError)
                    raise ConfigError(f"config.{key}: {too_large}; use a number within float32's range") from None
                if hasattr(current, "keys"):
                    raise ConfigError(f"config.{key} = {value!r}: config.{key} is a section, not a value; override "
                                      f"its keys (e.g. {{'{key}.{sorted(current.keys())[0]}': ...}}; keys of "
                                      f"config.{key}: {sorted(current.keys())})") from None
                raise ConfigError(f"config.{key} = {value!r}: expected {_kind(current)}"
                                  + (f" (as its value {current!r})" if current is not None else "")
                                  + f", got {type(value).__name__}") from None
    return cfg


def _require_no_arguments(path: str, get_config) -> None:
    """:class:`ConfigError` naming the config file ``path`` unless its ``get_config`` is a callable that takes no
    arguments (every parameter has a default): :func:`load_config` and the command call ``get_config()``."""
    import inspect

    if not callable(get_config):
        raise ConfigError(f"cannot load the config file {path!r}: its get_config is {type(get_config).__name__}, not a "
                          f"function; define get_config() returning the config")
    try:
        sig = inspect.signature(get_config)
    except (TypeError, ValueError):  # (a callable without a signature: called as it is)
        return
    try:
        sig.bind()
    except TypeError as e:
        raise ConfigError(f"cannot load the config file {path!r}: get_config{sig} cannot be called without "
                          f"arguments ({e}); the config is what get_config() returns: give its parameters defaults, "
                          f"or call it yourself and validate what it returns") from None


def missing_key_text(key: str, node) -> str:
    """The message for an override of the dotted ``key`` whose last part the config's section ``node`` lacks: an
    unknown key, or (a key of the schema) one the config file dropped by replacing the section with a dict or
    ``ConfigDict`` of its own (``config.optim = {"name": "sgd", "lr": 0.05}``: ``--config.optim.momentum=0.5``
    was refused as "bad config override among [...]: momentum", as an unknown key by :func:`load_config`)."""
    parts = key.split(".")
    have = sorted(node.keys())
    if len(parts) == 1:  # a top-level key or a whole section the config lacks
        if parts[0] in SECTIONS or parts[0] in {f.name for f in dataclasses.fields(Settings)}:
            what = "section" if parts[0] in SECTIONS else "key"
            return (f"config.{key}: the config has no {what} {parts[0]!r} (its keys: {have}), though the schema has "
                    f"one: the config file does not start from quotient_sgd.config.default_config(), which holds "
                    f"every key; start from it, or set config.{key} in the file")
        return f"config.{key}: unknown key; allowed keys: {have}"
    sect = SECTIONS.get(parts[0]) if len(parts) == 2 else None
    fields = {f.name: f.default for f in dataclasses.fields(sect)} if sect is not None else {}
    if parts[-1] in fields:
        return (f"config.{key}: the config's section config.{parts[0]} has no key {parts[-1]!r} (its keys: {have}), "
                f"though the schema has one (default {fields[parts[-1]]!r}): the config file replaced the section "
                f"by one without it; keep default_config()'s section and set its keys (config.{parts[0]}.name = "
                f"..., or config.{parts[0]}.update(...)), or set {key} in the file")
    return f"config.{key}: unknown key; allowed keys: {have}"


def quickstart_path() -> str:
    """The default config shipped inside the package (``quotient-sgd run`` with no ``--config``)."""
    return os.path.join(os.path.dirname(__file__), "quickstart.py")


#: The keys read only by some choices of ``model.name`` / ``data.name`` / ``optim.name`` (the others ignore them).
_READ_BY = {
    "model": {"hidden": ("mlp", "deep_linear"), "activation": ("mlp", "cnn", "transformer", "meanfield"),
              "channels": ("cnn",), "kernel_size": ("cnn",), "norm": ("cnn",), "d_model": ("transformer",),
              "num_heads": ("transformer",), "num_layers": ("transformer",), "mlp_ratio": ("transformer",),
              "width": ("meanfield",)},
    "data": {"n_train": ("teacher_student", "sparse_parity"), "n_test": ("teacher_student", "sparse_parity"),
             "din": ("teacher_student",), "dout": ("teacher_student",), "teacher_hidden": ("teacher_student",),
             "noise": ("teacher_student",), "p": ("modular_arithmetic",), "train_fraction": ("modular_arithmetic",),
             "n_bits": ("sparse_parity",), "k": ("sparse_parity",), "test_fraction": ("digits",)},
    "optim": {"momentum": ("sgd",), "nesterov": ("sgd",), "b1": ("adam", "adamw"), "b2": ("adam", "adamw"),
              "eps": ("adam", "adamw"), "weight_decay": ("sgd", "adamw")},
}


def unused_keys(s: Settings, command: str = "run") -> dict[str, str]:
    """``{dotted key: why}`` for the keys that ``quotient-sgd <command>`` (``"run"`` or ``"sweep"``) does not read
    with the settings ``s``: those of another model, data set or optimiser (``model.channels`` of an MLP), the
    Lanczos sizes without ``observables.hessian_every``, ``optim.nesterov`` of SGD without momentum,
    ``observables.per_example_grads`` without ``observables.noise_every``, ``observables.every`` without a symmetry
    group or with ``observables.names = ('loss',)``, ``observables.curvature_batch`` without a curvature, shock or
    fold number recorded, ``symmetry.gauge_fix_every`` outside ``gauge_fix`` mode, ``symmetry.components`` with the
    symmetry off, ``checkpoint.keep`` without checkpoints, under ``run`` the ``sweep`` section, and under ``sweep``
    the settings its axes replace (``optim.lr`` with a ``sweep.lr``). A config file holds every key
    (:func:`default_config`); a ``--config.<key>`` override of one of these would have no effect."""
    out: dict[str, str] = {}
    for sect, table in _READ_BY.items():
        chosen = getattr(s, sect).name
        for key, readers in table.items():
            if chosen not in readers:
                out[f"{sect}.{key}"] = (f"only {sect}.name in {list(readers)} reads it, and this config has "
                                        f"{sect}.name = {chosen!r} (set {sect}.name too, or drop the override)")
    momenta = (s.sweep.momentum or (s.optim.momentum,)) if command == "sweep" else (s.optim.momentum,)
    if s.optim.name == "sgd" and not any(momenta):
        # (Nesterov's look-ahead of a trace that decays at once: the update is the gradient, the run bit for bit
        # the run without it, events and observables too)
        key = "sweep.momentum" if command == "sweep" and s.sweep.momentum else "optim.momentum"
        out["optim.nesterov"] = (f"read only with momentum > 0 (Nesterov's look-ahead along the momentum trace), and "
                                 f"this config has {key} = {setting(s, key)}: the update is the gradient either way; "
                                 f"set {key} > 0 too, or drop the override")
    if s.observables.hessian_every == 0:
        for key in ("hessian_k", "lanczos_steps"):
            out[f"observables.{key}"] = ("read only with observables.hessian_every > 0, and this config has 0 "
                                         "(off); set observables.hessian_every too, or drop the override")
    if s.observables.noise_every == 0:
        out["observables.per_example_grads"] = ("read only with observables.noise_every > 0 (the gradient-noise "
                                                "temperature, the only user of per-example gradients), and this "
                                                "config has 0 (off); set observables.noise_every too, or drop the "
                                                "override")
    from ._build_check import selected_components

    if not selected_components(s):  # (no group: the optimiser records the loss only, no quotient observable)
        why = ("symmetry.enabled=False" if not s.symmetry.enabled else
               f"this {s.model.name} has no symmetry component that symmetry.components = {s.symmetry.components} "
               f"selects")
        out["observables.every"] = (f"read only with a symmetry group, and this run has none ({why}): it records "
                                    f"the loss at every step and no quotient observable to refresh; "
                                    + ("set symmetry.enabled=True too" if not s.symmetry.enabled else
                                       "select a component the model has")
                                    + ", or drop the override")
    elif tuple(s.observables.names) == ("loss",):
        # (the loss is recorded at every step whatever observables.every is: the trajectories of every=1 and every=3
        # with the Hessian extremes and the noise temperature on were equal bit for bit)
        out["observables.every"] = ("read only by the per-step quotient observables, and this config's "
                                    "observables.names = ('loss',) records the loss alone, at every step whatever "
                                    "observables.every is (the Hessian extremes and the noise temperature have their "
                                    "own periods, observables.hessian_every and noise_every); add an observable to "
                                    "observables.names (or set it to () for the defaults), or drop the override")
    from ..optim import DEFAULT_OBSERVABLES

    curv = [n for n in ("curvature", "shock_number", "fold_number")
            if n in (tuple(s.observables.names) or DEFAULT_OBSERVABLES)]
    if not curv or not selected_components(s):
        out["observables.curvature_batch"] = (
            "read only when the run records curvature, shock_number or fold_number (with a symmetry group), and this "
            + (f"config's observables.names = {tuple(s.observables.names)} holds none of them; add one"
               if not curv else "run has no symmetry group; enable one") + ", or drop the override")
    if s.symmetry.mode != "gauge_fix":
        out["symmetry.gauge_fix_every"] = (f"read only with symmetry.mode='gauge_fix', and this config has "
                                           f"{s.symmetry.mode!r}; set symmetry.mode too, or drop the override")
    if not s.symmetry.enabled:
        out["symmetry.components"] = ("not read with symmetry.enabled=False; set symmetry.enabled=True too, or drop "
                                      "the override")
    if not s.checkpoint.enabled:
        out["checkpoint.keep"] = ("not read with checkpoint.enabled=False (no checkpoint is written); set "
                                  "checkpoint.enabled=True too, or drop the override")
    if command == "sweep":
        for axis, values in s.sweep.axes().items():
            out[SWEEP_AXES[axis]] = (f"every member of the sweep takes it from sweep.{axis} = {values}; override "
                                     f"sweep.{axis} instead (e.g. --config.sweep.{axis}=\"({values[0]!r},)\"), or "
                                     f"empty it (--config.sweep.{axis}=\"()\")")
    if command == "run":
        for f in dataclasses.fields(SECTIONS["sweep"]):
            out[f"sweep.{f.name}"] = ("the sweep section is read by `quotient-sgd sweep`; `run` trains one model "
                                      "with the config's own values (optim.lr, seed, ...): use `quotient-sgd sweep`, "
                                      "or override those keys")
    return out
