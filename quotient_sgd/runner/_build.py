"""Settings -> (model, symmetry group, data, loss, optimiser chain): everything a run needs, built once."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .. import data as qdata
from ..config import ConfigError, Settings


def make_model(s: Settings, rngs: nnx.Rngs) -> nnx.Module:
    """The configured model (``model.name``), sized from the configured data.  ``s``: a validated
    :class:`~quotient_sgd.config.Settings` (anything else raises ``TypeError``)."""
    from .. import models

    require_settings(s, "make_model", "s")
    from ..config._build_check import input_spec

    m = s.model
    shape, dout, _ = input_spec(s)
    classification = s.data.name != "teacher_student"
    din = math.prod(shape)
    if m.name == "mlp":
        return models.MLP(din, tuple(m.hidden), dout, activation=m.activation, classifier=classification, rngs=rngs)
    if m.name == "deep_linear":
        return models.DeepLinear(din, tuple(m.hidden), dout, rngs=rngs)
    if m.name == "meanfield":
        return models.MeanField(din, m.width, dout, activation=m.activation, rngs=rngs)
    if m.name == "cnn":
        return models.CNN(shape[-1], tuple(m.channels), dout, kernel_size=m.kernel_size,
                          norm=None if m.norm == "none" else m.norm, activation=m.activation, classifier=True,
                          rngs=rngs)
    if m.name == "transformer":
        return models.Transformer(s.data.p + 1, m.d_model, m.num_heads, m.num_layers, shape[0], rngs=rngs,
                                  mlp_ratio=m.mlp_ratio, activation=m.activation, classifier=True)
    raise ValueError(f"config.model.name = {m.name!r}: unknown model")


def make_dataset(s: Settings) -> qdata.Dataset:
    """The configured data set (deterministic in ``data.seed``).  ``s``: a validated
    :class:`~quotient_sgd.config.Settings` (anything else raises ``TypeError``: a ``ConfigDict`` was read without
    validation, and one whose ``data.name`` was no data set, e.g. ``'mnist'``, silently gave the digits); a
    ``data.name`` that is none of :data:`quotient_sgd.config.DATASETS` (settings changed by ``Settings.replace``,
    which does not validate) raises a :class:`~quotient_sgd.config.ConfigError` (a ``ValueError``), and so does a
    generator refusing the settings (``data.noise = 1e38``, whose targets overflow float32, ended the command in a
    traceback naming ``y_train``): naming ``data.name`` and the generator's reason."""
    require_settings(s, "make_dataset", "s")
    try:
        return _make_dataset(s)
    except ConfigError:
        raise
    except ValueError as e:  # (a traceback ending in the generator's ValueError)
        raise ConfigError(f"config.data.name = {s.data.name!r}: the data set cannot be built from these settings of "
                          f"config.data: {e}") from None


def _make_dataset(s: Settings) -> qdata.Dataset:
    d = s.data
    if d.name == "teacher_student":
        return qdata.teacher_student(seed=d.seed, n_train=d.n_train, n_test=d.n_test, din=d.din, dout=d.dout,
                                     teacher_hidden=d.teacher_hidden, noise=d.noise)
    if d.name == "modular_arithmetic":
        enc = "tokens" if s.model.name == "transformer" else "onehot"
        return qdata.modular_arithmetic(seed=d.seed, p=d.p, train_fraction=d.train_fraction, encoding=enc)
    if d.name == "sparse_parity":
        return qdata.sparse_parity(seed=d.seed, n_bits=d.n_bits, k=d.k, n_train=d.n_train, n_test=d.n_test)
    if d.name == "digits":
        return qdata.digits(seed=d.seed, test_fraction=d.test_fraction,
                            layout="image" if s.model.name == "cnn" else "flat")
    raise ConfigError(f"config.data.name = {d.name!r}: unknown data set; allowed: {list(qdata.GENERATORS)}")


# ---- losses: module-level functions, bound with functools.partial (hashable, so train() caches them) --------
def _merge(graphdef, params, model_state):
    return nnx.merge(graphdef, params) if model_state is None else nnx.merge(graphdef, params, model_state)


def _head(out, last_token: bool):
    return out[:, -1, :] if last_token else out


def _example_losses(out, y, task: str):
    if task == "classification":
        return optax.softmax_cross_entropy_with_integer_labels(out, y)
    return 0.5 * jnp.sum(jnp.square(out - y), axis=-1)


def _weighted_mean(l, w):
    w = w.astype(l.dtype)
    return jnp.sum(w * l) / jnp.sum(w)


def example_losses(params, batch, *, graphdef, task: str, last_token: bool):
    """Per-example losses ``(B,)``: cross-entropy (classification) or squared error summed over outputs / 2."""
    out = _head(nnx.merge(graphdef, params)(batch["x"]), last_token)
    return _example_losses(out, batch["y"], task)


def batch_loss(params, batch, *, graphdef, task: str, last_token: bool):
    """``sum(w * l) / sum(w)`` over the batch (``w``: padding mask of a batch-size sweep)."""
    return _weighted_mean(example_losses(params, batch, graphdef=graphdef, task=task, last_token=last_token),
                          batch["w"])


def stateful_batch_loss(params, model_state, batch, *, graphdef, task: str, last_token: bool):
    """The training-mode loss of a model with non-parameter state (BatchNorm's running statistics):
    ``(loss, (None, new_model_state))``, the convention of :func:`quotient_sgd.optim.train` with
    ``model_state``.  The batch statistics normalise; the running ones are updated and threaded to the next step."""
    model = _merge(graphdef, params, model_state)
    out = _head(model(batch["x"]), last_token)
    _, _, new_state = nnx.split(model, nnx.Param, ...)
    return _weighted_mean(_example_losses(out, batch["y"], task), batch["w"]), (None, new_state)


def evaluate(params, batch, model_state=None, *, graphdef, task: str, last_token: bool) -> dict:
    """Loss (and accuracy for classification) on a whole split; a model with state is evaluated in evaluation
    mode (``model.eval()``: BatchNorm normalises with its running statistics)."""
    model = _merge(graphdef, params, model_state)
    if model_state is not None:
        model.eval()
    out = _head(model(batch["x"]), last_token)
    loss = jnp.mean(_example_losses(out, batch["y"], task))
    if task == "classification":
        # (the predicted class in the labels' dtype: with x64 on, argmax is int64 against the int32 labels, which
        # strict dtype promotion refuses; every classification run failed at its first chunk's evaluation)
        pred = jnp.argmax(out, axis=-1).astype(batch["y"].dtype)
        acc = jnp.mean((pred == batch["y"]).astype(jnp.float32))
        return {"loss": loss, "accuracy": acc}
    return {"loss": loss}


# ---- optimiser ------------------------------------------------------------------------------------------------
def _sgd(learning_rate, momentum, weight_decay, nesterov=False, clip_norm=0.0):
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
    parts += [optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)]
    return optax.chain(*parts)


def _adam(learning_rate, weight_decay, b1=0.9, b2=0.999, eps=1e-8, clip_norm=0.0, decoupled=True):
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
    if decoupled:
        parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    else:
        parts.append(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))
    return optax.chain(*parts)


def make_inner_optimizer(s: Settings) -> optax.GradientTransformation:
    """The optimiser with ``learning_rate``, ``weight_decay`` (and ``momentum`` for SGD) injected
    (``optax.inject_hyperparams``): a sweep sets them per member in the state, without recompiling.  An
    ``optim.name`` other than ``sgd``, ``adam`` or ``adamw`` raises ``ValueError`` (it was run as Adam)."""
    o = s.optim
    if o.name not in ("sgd", "adam", "adamw"):
        raise ValueError(f"config.optim.name = {o.name!r}: unknown optimiser; allowed: ['sgd', 'adam', 'adamw']")
    if o.name == "sgd":
        return optax.inject_hyperparams(_sgd, static_args=("nesterov", "clip_norm"))(
            learning_rate=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov,
            clip_norm=o.clip_norm)
    return optax.inject_hyperparams(_adam, static_args=("b1", "b2", "eps", "clip_norm", "decoupled"))(
        learning_rate=o.lr, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, clip_norm=o.clip_norm,
        decoupled=o.name == "adamw")


def select_group(s: Settings, full):
    """The components of ``full`` selected by ``symmetry.components`` (a Product), or None."""
    from ..symmetry import Product

    if not s.symmetry.enabled:
        return None
    want = s.symmetry.components
    comps = [c for c in full.components
             if "all" in want or c.name in want or c.name.split("/")[0] in want]
    return Product(comps, name=full.name, **solver_settings(full)) if comps else None


def solver_settings(group) -> dict:
    """The solver settings of the Product ``group`` (kept by the Products built from its components)."""
    return {k: getattr(group, k) for k in ("newton", "newton_iters", "sweeps", "dense_max")}


def make_optimizer(s: Settings, group) -> optax.GradientTransformation:
    """``quotient_trajectory( [horizontal | gauge_fix]( inject_hyperparams(optimiser) ), group)``; with Adam /
    AdamW and ``observables.hessian_every > 0`` the Hessian extremes include ``"preconditioned"``
    (``sharpness_preconditioned``: ``P^-1 H`` with Adam's ``P`` from the config's ``b1, b2, eps``,
    :func:`quotient_sgd.optim.adam_preconditioner`).  ``s``: a validated :class:`~quotient_sgd.config.Settings`
    (anything else raises ``TypeError``)."""
    from .. import optim

    require_settings(s, "make_optimizer", "s")
    tx = make_inner_optimizer(s)
    if group is None:
        return tx
    sym, ob = s.symmetry, s.observables
    spec = None
    if sym.mode == "horizontal":
        tx = optim.horizontal(tx, group)
    elif sym.mode == "gauge_fix":
        tx = optim.gauge_fix(tx, group, every=sym.gauge_fix_every)
    elif s.optim.name == "sgd":
        spec = optim.SGDSpec("learning_rate", momentum="momentum", nesterov=s.optim.nesterov,
                             coupled_weight_decay="weight_decay")
    extra: dict[str, Any] = {}
    if s.optim.name in ("adam", "adamw") and ob.hessian_every:
        # Adam's own edge of stability: the top eigenvalue of P^-1 H (sharpness_preconditioned)
        extra = dict(hessian_at=("quotient", "horizontal", "raw", "preconditioned"),
                     preconditioner=optim.adam_preconditioner(s.optim.b1, s.optim.b2, s.optim.eps))
    return optim.quotient_trajectory(
        tx, group, observables=tuple(ob.names) or None, every=ob.every,
        hessian_every=ob.hessian_every or None, spec=spec, hessian_k=ob.hessian_k, lanczos_steps=ob.lanczos_steps,
        noise_every=ob.noise_every or None, seed=0, curvature_batch=ob.curvature_batch, **extra)


@dataclasses.dataclass(frozen=True, eq=False)
class Built:
    """Everything static about a run: hashable by identity, so jitted programs built on it are cached.

    ``stateful``: the model has non-parameter state (BatchNorm's running statistics), threaded through training
    as ``model_state`` (``loss_fn(params, model_state, batch) -> (loss, (None, new_model_state))``); otherwise
    ``loss_fn(params, batch) -> loss``."""

    settings: Settings
    graphdef: Any
    rest: Any
    group: Any            # the selected Product (observables / projections), or None
    gauge_group: Any      # continuous part used by init_gauge, or None
    dataset: qdata.Dataset
    tx: optax.GradientTransformation
    loss_fn: Callable
    example_loss_fn: Callable | None
    eval_fn: Callable
    num_params: int
    stateful: bool = False
    act_on_model_state: Callable | None = None  # the group's action on the model state (gauge_fix follows it)


def program_settings(s: Settings) -> Settings:
    """``s`` with every value that is an input of the compiled programs (not part of their structure) reset:
    seed, injected hyperparameters, init_gauge, and the bookkeeping sections.  Runs that agree on the result
    share one :class:`Built`, hence one compilation (a loop over seeds or learning rates compiles once)."""
    d = Settings()
    return dataclasses.replace(
        s, name=d.name, steps=d.steps, seed=d.seed, init_gauge=d.init_gauge, logging=d.logging,
        checkpoint=d.checkpoint, sweep=d.sweep,
        optim=dataclasses.replace(s.optim, lr=d.optim.lr, momentum=d.optim.momentum,
                                  weight_decay=d.optim.weight_decay))


def build(s: Settings) -> Built:
    """Build the model structure, group, data, loss and optimiser of a validated config (cached: runs whose
    :func:`program_settings` agree get the same object).  ``s``: a :class:`~quotient_sgd.config.Settings`, what
    ``quotient_sgd.config.validate(config)`` returns for a ``ConfigDict``; anything else raises ``TypeError``."""
    require_settings(s, "build", "s")
    return _build(program_settings(s))


def require_max_chunks(max_chunks, where: str) -> None:
    """``ValueError`` naming ``max_chunks`` unless it is ``None`` or an integer >= 0 (-1 and 2.5 computed nothing,
    or stopped after three chunks, without a word)."""
    if max_chunks is not None and (isinstance(max_chunks, (bool, np.bool_))
                                   or not isinstance(max_chunks, (int, np.integer)) or max_chunks < 0):
        raise ValueError(f"{where}: max_chunks={max_chunks!r} is not allowed; need an integer >= 0 (stop after that "
                         f"many chunks) or None (every chunk)")


def require_settings(s, where: str, arg: str) -> None:
    """``TypeError`` naming ``where`` and its argument ``arg`` unless ``s`` is a validated
    :class:`~quotient_sgd.config.Settings` (a ``ConfigDict`` is validated first: ``quotient_sgd.config.validate``)."""
    if not isinstance(s, Settings):
        raise TypeError(f"{where}: {arg} must be a quotient_sgd.config.Settings (a validated config), got "
                        f"{type(s).__name__}; pass quotient_sgd.config.validate(config)")


@functools.lru_cache(maxsize=16)
def _build(s: Settings) -> Built:
    from ..symmetry import Product

    model = nnx.eval_shape(lambda: make_model(s, nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    stateful = bool(jax.tree.leaves(rest))
    group = select_group(s, model.symmetries())
    gauge = None
    if group is not None:
        cont = [c for c in group.components if c.continuous]
        gauge = Product(cont, name="gauge", **solver_settings(group)) if cont else None
    ds = make_dataset(s)
    kw = dict(graphdef=graphdef, task=ds.task, last_token=s.model.name == "transformer")
    need_ex = s.observables.per_example_grads
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    loss = functools.partial(stateful_batch_loss if stateful else batch_loss, **kw)
    act = None
    if stateful and group is not None and s.symmetry.mode == "gauge_fix":
        if not hasattr(model, "act_on_batch_stats"):
            raise ValueError(f"symmetry.mode='gauge_fix': {type(model).__name__} has non-parameter state and no "
                             f"act_on_batch_stats, so re-gauging would change its evaluation-mode function")
        act = functools.partial(model.act_on_batch_stats, group)
    return Built(s, graphdef, rest, group, gauge, ds, make_optimizer(s, group), loss,
                 functools.partial(example_losses, **kw) if need_ex else None,
                 functools.partial(evaluate, **kw), int(n), stateful, act)


def init_params(b: Built, seed, init_gauge):
    """Initial parameters for ``seed`` (traceable: usable under ``vmap`` over seeds), moved by a random element
    of the continuous symmetries of scale ``init_gauge`` when ``init_gauge > 0`` (same function, different
    parameterisation; ``0`` or ``None``: not moved).  ``b``: what :func:`build` returns (anything else raises
    ``TypeError``).  A concrete ``init_gauge`` that is not a finite number ``>= 0`` raises ``ValueError`` naming it
    (as ``config.init_gauge`` is refused): a negative or NaN scale returned the unmoved parameters without a word,
    and ``True`` moved them by a scale of 1."""
    if not isinstance(b, Built):
        raise TypeError(f"init_params: b must be the Built of quotient_sgd.runner.build(settings), got "
                        f"{type(b).__name__}" + ("; pass build(settings)" if isinstance(b, Settings) else ""))
    _require_gauge_scale(init_gauge, "init_params")
    return init_model(b, seed, init_gauge)[0]


def _require_gauge_scale(init_gauge, where: str) -> None:
    """``ValueError`` naming ``where``'s ``init_gauge`` unless it is ``None``, a traced value, or a real number
    (Python, NumPy or a 0-d array; not a bool) that is finite and ``>= 0``."""
    if init_gauge is None or isinstance(init_gauge, jax.core.Tracer):
        return
    try:
        a = np.asarray(init_gauge)
    except Exception:  # noqa: BLE001  (no array at all: refused below)
        a = None
    ok = (a is not None and a.ndim == 0 and a.dtype.kind in "iuf" and not isinstance(init_gauge, (bool, np.bool_)))
    if ok:
        ok = math.isfinite(float(a)) and float(a) >= 0
    if not ok:
        raise ValueError(f"{where}: init_gauge={init_gauge!r} is not allowed; need a finite number >= 0 (the scale "
                         f"of the random element of the continuous symmetries; 0 or None: not re-gauged)")


def _int32_seed(seed, where: str):
    """``seed`` as the int32 the runner's programs take (a traced value as it is), or a ``ValueError`` naming
    ``where``'s ``seed`` unless it is an integer in ``[-2^31, 2^31 - 1]`` (a Python or NumPy integer, or a 0-d
    integer array): without x64 ``jax.random.key`` keeps the low 32 bits of a larger one, so ``seed = 2^32`` gave
    the parameters of seed 0, silently (a float seed failed in JAX's "PRNG key seed must be an integer; got
    JitTracer"); with x64 a Python ``-1`` was an int64 key, other parameters than the run of ``seed = -1``
    (whose programs take ``jnp.int32(seed)``) starts from."""
    if isinstance(seed, jax.core.Tracer):
        return seed
    a = np.asarray(seed) if not isinstance(seed, int) else None
    ok = (not isinstance(seed, (bool, np.bool_)) and
          (isinstance(seed, int) or (a.ndim == 0 and a.dtype.kind in "iu")))
    if ok:
        ok = -(2**31) <= int(seed) <= 2**31 - 1
    if not ok:
        raise ValueError(f"{where}: seed={seed!r} is not allowed; need an integer in [-2^31, 2^31 - 1] (the seeds "
                         f"of the compiled programs are int32, as config.seed)")
    return np.int32(int(seed))


def init_model(b: Built, seed, init_gauge):
    """``(params, model_state)`` for ``seed``: :func:`init_params` and the model's initial non-parameter state
    (``None`` for a model without one), both moved by :func:`regauge` when ``init_gauge > 0`` (``None``: the
    re-gauging is left out of the traced program)."""
    key = jax.random.key(_int32_seed(seed, "init_params"))
    model = make_model(b.settings, nnx.Rngs(params=jax.random.fold_in(key, 0)))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    model_state = rest if b.stateful else None
    if init_gauge is None:
        return params, model_state
    return regauge(b, jax.random.fold_in(key, 2), params, model_state, init_gauge)


def regauge(b: Built, key, params, model_state, scale):
    """``(params, model_state)`` moved by a random element of the continuous symmetries (``b.gauge_group``) of
    scale ``scale`` (traceable; unchanged where ``scale == 0``): the same function, another parameterisation.
    Non-parameter state follows the element (BatchNorm's running statistics: ``CNN.act_on_batch_stats``), so
    the evaluation-mode function is the same too."""
    if b.gauge_group is None:
        return params, model_state
    scale = jnp.asarray(scale, jnp.float32)
    g = b.gauge_group.sample(key, params, scale)
    keep = lambda a, p: jnp.where(scale > 0, a, p)  # noqa: E731
    moved = jax.tree.map(keep, b.gauge_group.act(g, params), params)
    if model_state is not None:
        model = nnx.merge(b.graphdef, params, model_state)
        if not hasattr(model, "act_on_batch_stats"):
            raise ValueError(f"{type(model).__name__} has non-parameter state and no act_on_batch_stats: "
                             f"re-gauging would change its evaluation-mode function")
        model_state = jax.tree.map(keep, model.act_on_batch_stats(b.gauge_group, g, model_state), model_state)
    return moved, model_state


#: The largest change of a model's outputs, relative to their largest value, that re-gauging may make (float32
#: rounding alone: ~1e-6 at ``init_gauge = 1``).  Measured on the first 256 training examples over seeds 0-3: the
#: digits CNN's outputs moved by 1.5e-6, 2.8e-4, 3.1e-3, 1.9e-2, 1.9e-1 of their largest value at
#: ``init_gauge`` 1, 3, 4, 5, 6 (40 times it at 10), the grokking Transformer's by 5.5e-7, 2.1e-4, 4.1e-3,
#: 6.8e-2, 0.62 (NaN from 8); an MLP's stayed at 2e-7 (one rescaling per unit, no product of them).
GAUGE_TOLERANCE = 1e-3

_GAUGE_EXAMPLES = 256


@functools.lru_cache(maxsize=16)
def _gauge_change(b: Built):
    """Jitted ``(seed, scale) -> (max |f_g - f|, max |f|)``: the model's outputs on the first
    :data:`_GAUGE_EXAMPLES` training examples at the initial parameters of ``seed`` and at those re-gauged by
    :func:`regauge` of ``scale`` (evaluation mode: BatchNorm's running statistics, moved with the parameters)."""
    x = b.dataset.x_train[:_GAUGE_EXAMPLES]
    last_token = b.settings.model.name == "transformer"

    def outputs(params, model_state):
        model = _merge(b.graphdef, params, model_state)
        if model_state is not None:
            model.eval()
        return _head(model(x), last_token)

    def change(seed, scale):
        f0 = outputs(*init_model(b, seed, None))
        fg = outputs(*init_model(b, seed, scale))
        return jnp.max(jnp.abs(fg - f0)), jnp.max(jnp.abs(f0))

    return jax.jit(change)


def check_init_gauge(b: Built, gauges: list[tuple[str, float, list[int]]]) -> None:
    """:class:`~quotient_sgd.config.ConfigError` naming the key when re-gauging by a random element of its scale
    does not keep the function in float32: ``gauges`` lists ``(key, scale, seeds)`` (``init_gauge``, or a value of
    ``sweep.init_gauge`` with the seeds of its members).  The element (``group.sample(key, params, scale)``)
    multiplies parameters by factors ``exp(u)`` (rescales and scales: ``u`` uniform in ``(-2 scale, 2 scale)``; a
    GL head's singular values within ``exp(+-1.5 scale)``), chained over a model's layers: at ``init_gauge = 10``
    the digits CNN's outputs changed by 40 times their size and the Transformer's became NaN, and the run trained
    another function (or diverged at step 0) where "the same function, another parameterisation" was promised.  A
    change above :data:`GAUGE_TOLERANCE` of the outputs' largest value (or a non-finite one) is refused before
    anything is written.  Scales of 0 cost nothing; the others one small compiled program."""
    todo = [(key, g, seeds) for key, g, seeds in gauges if g > 0]
    if not todo or b.gauge_group is None:
        return
    change = _gauge_change(b)
    for key, g, seeds in todo:
        for seed in seeds:
            d, f = (float(v) for v in change(jnp.int32(seed), jnp.float32(g)))
            rel = d / f if f > 0 else (0.0 if d == 0 else math.inf)
            if not rel <= GAUGE_TOLERANCE:
                n = min(_GAUGE_EXAMPLES, int(b.dataset.x_train.shape[0]))
                raise ConfigError(
                    f"config.{key} = {g}: re-gauging by a random element of this scale does not keep the function "
                    f"of this {b.settings.model.name} in float32: for seed {seed} its outputs on the first {n} "
                    f"training examples moved by {rel:.3g} of their largest value (more than {GAUGE_TOLERANCE:g}; "
                    f"factors up to exp(+-{2 * g:g}) overflow or round away the products of the layers); use a smaller "
                    f"{key} (float32 rounding alone moves them by ~1e-6 at 1)")


def batch_key(seed):
    """The PRNG key of the batch sampler of ``seed`` (``train`` folds in the step)."""
    return jax.random.fold_in(jax.random.key(seed), 1)
