"""What a run or a sweep holds in memory, checked against the machine before anything is computed.

Validation (:func:`quotient_sgd.config.validate`) refuses a data set or a model (its parameters, gradient,
optimiser state and per-example gradients) larger than this machine's memory, by arithmetic.  What depends on
the built programs is checked here, from their shapes (``jax.eval_shape``: nothing is computed): the bytes the
trajectory records per step (every observable, the loss and the step), a member's whole training state (with the
observables' carries and the Lanczos vectors), and, for a sweep, how many members are held at once.

Each amount is a lower bound of what the run allocates (XLA's temporaries come on top), so nothing that runs is
refused:

- a run holds its state, its data set and one step's gradient (and per-example gradients, for the noise
  temperature) on its device, a chunk's trajectory (``checkpoint.every`` steps) on the device and the host, and its
  whole trajectory on the host when it is assembled into ``trajectory.npz``;
- a sweep holds every member's state on the devices (groups are padded to ``members per device * devices``
  members) and, for the checkpoint, a copy on the host; every member's chunk of trajectory; the gradients of the
  members that run at once (``members per device`` on each device); one member's whole trajectory while it is
  assembled; and the data set, which every device holds a copy of (:func:`dataset_bytes`).

CPU devices share the host's memory: everything counts against it.  An accelerator's memory is its allocator's
limit (``memory_stats()["bytes_limit"]``), per device.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ..config import ConfigError, Settings
from ..config._validate import _size_key, physical_memory, setting, train_size
from ._build import Built
from ._chunk import init_program


@functools.lru_cache(maxsize=16)
def state_shapes(b: Built, regauge: bool = False):
    """The shapes of one member's ``(params, opt_state, model_state)`` (nothing is computed), from the jitted
    initialisation the run calls (:func:`~._chunk.init_program`; ``regauge``: as the run calls it), whose trace
    its first call then reuses."""
    return init_program(b, regauge).eval_shape(jnp.int32(0), jnp.float32(0), jnp.float32(0.1), jnp.float32(0),
                                               jnp.float32(0))


def _nbytes(tree) -> int:
    return sum(int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=16)
def footprint(b: Built, regauge: bool = False) -> tuple[int, int, int]:
    """``(state, step, work)`` bytes of one member: its training state; what its trajectory records per step (every
    observable, the loss, the int64 step); and what one step holds besides (the gradient, and the ``B`` per-example
    gradients of the noise temperature, one float32 copy of the parameters per example)."""
    from ..optim._trajectory import _find

    shapes = state_shapes(b, regauge)
    found = _find(shapes[1])
    recorded = dict(found[0].observables) if found else {}
    recorded["loss"] = jax.ShapeDtypeStruct((), jnp.float32)
    params = _nbytes(shapes[0])
    s = b.settings
    work = params
    if s.observables.noise_every > 0:
        work += params * per_example_batch(s)
    return _nbytes(shapes), _nbytes(recorded) + 8, work


def per_example_batch(s: Settings) -> int:
    """The examples whose gradients the noise temperature takes at once: its batch (a batch-size sweep is refused
    with the noise temperature)."""
    return s.data.batch_size or train_size(s.data)


def dataset_bytes(s: Settings) -> int:
    """The bytes of the configured data set as the programs hold it (float32 inputs or int32 tokens, float32
    regression targets or int32 labels, train and test), by arithmetic.  A sweep places a copy of it on every
    device (replicated over the mesh), besides the run's own copy on the default device: on CPU devices, which
    share this machine's memory, ``devices + 1`` copies."""
    from ..config._build_check import input_spec
    from ..config._validate import split_sizes

    shape, dout, _ = input_spec(s)
    per_example = 4 * math.prod(shape) + (4 * dout if s.data.name == "teacher_student" else 4)
    return sum(split_sizes(s.data)) * per_example


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def device_memory(device) -> int | None:
    """The memory of an accelerator ``device`` in bytes (its allocator's limit), ``None`` for a CPU device (it
    shares the host's memory) or one that does not say."""
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (a backend without memory statistics)
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def _what_work(s: Settings, b: Built) -> tuple[str, str]:
    """The key that sets a step's working memory, and what to do about it."""
    if s.observables.noise_every > 0:
        return ("observables.per_example_grads",
                (f"the noise temperature (observables.noise_every = {s.observables.noise_every}) takes the "
                 f"gradients of the {per_example_batch(s)} examples of a batch at once, each as large as the "
                 f"{b.num_params} parameters; use a smaller data.batch_size, a smaller model, or "
                 f"observables.noise_every=0"))
    key = f"model.{_size_key(s.model)}"
    return key, f"use a smaller {key}"


def _refuse(key: str, value, text: str) -> ConfigError:
    if " " in key:  # (the members_per_device argument of sweep(), not a config key)
        return ConfigError(f"sweep: {key.split()[-2]}={value!r}: {text}")
    return ConfigError(f"config.{key} = {value!r}: {text}")


def _term_text(term: str, b: Built, s: Settings, fp: tuple, n: int = 1, sweep: bool = False,
               ) -> tuple[str, object, str, str]:
    """``(key, value, what it holds, advice)`` of a term of :func:`run_memory_need` / :func:`sweep_memory_need`
    (``fp``: the :func:`footprint`)."""
    state, step, work = fp
    chunk_steps = min(s.checkpoint.every, s.steps)
    if term == "members":
        key, value, how = _members_key(s)
        return (key, value, (f"the sweep's {n} members ({how}) each hold {_gib(state)} of training state and "
                             f"{_gib(chunk_steps * step)} of a chunk's trajectory ({chunk_steps} steps)"),
                "sweep fewer members (or run them as several sweeps)")
    if term == "trajectory":
        return ("steps", s.steps, (f"the trajectory records {step} bytes a step (every observable, the loss and "
                                   f"the step), {_gib(s.steps * step)} for {s.steps} steps, assembled in memory "
                                   f"when the run (or member) finishes"),
                "use fewer steps, or record fewer observables (observables.names)")
    if term == "chunk":
        return ("checkpoint.every", s.checkpoint.every,
                (f"a chunk of {chunk_steps} steps records {_gib(chunk_steps * step)} of trajectory on the device, "
                 f"beside the training state ({_gib(state)})"), "use a smaller checkpoint.every (steps per chunk)")
    if term == "data":
        from ..config._validate import data_bytes

        key = data_bytes(s.data, s.model.name)[1]
        if not sweep:
            return (key, setting(s, key), f"the data set takes {_gib(dataset_bytes(s))} on the run's device",
                    f"use a smaller {key}")
        return (key, setting(s, key), (f"the data set ({_gib(dataset_bytes(s))} as the programs hold it) has a copy "
                                       f"on every device of the sweep (CPU devices share this machine's memory), "
                                       f"besides the run's own"),
                f"use a smaller {key}, or fewer devices (sweep(devices=...); JAX_NUM_CPU_DEVICES on CPU)")
    key, advice = _what_work(s, b)
    return (key, setting(s, key), "a step holds the gradient" + (" and the per-example gradients"
                                                                  if s.observables.noise_every > 0 else "")
            + f" ({_gib(work)} a member)", advice)


def run_memory_need(fp: tuple, s: Settings, accelerator: bool) -> tuple[dict, dict]:
    """The bytes a run of ``s`` holds (``fp``: its :func:`footprint`): ``({term: bytes} on the host, {term: bytes}
    on its device)`` (a CPU device's terms are the host's)."""
    state, step, work = fp
    chunk = min(s.checkpoint.every, s.steps) * step
    data = dataset_bytes(s)  # (the data set on the run's device)
    if accelerator:
        return {"trajectory": s.steps * step}, {"chunk": state + chunk, "step": work, "data": data}
    return {"trajectory": s.steps * step + state, "step": work, "data": data}, {}


def check_run_memory(b: Built, s: Settings, device=None, memory: int | None = None) -> None:
    """:class:`~quotient_sgd.config.ConfigError` naming the key when a run of ``s`` (built as ``b``) cannot hold
    what it computes: its whole trajectory (``steps``) on the host, or, on an accelerator ``device``, its state, a
    chunk of trajectory (``checkpoint.every`` steps), a step and the data set in the device's memory (on a CPU
    device, the data set in the host's).  ``memory``: the host's (default: this machine's physical memory).
    Nothing is computed."""
    device = jax.devices()[0] if device is None else device
    host_mem = physical_memory() if memory is None else memory
    acc = device_memory(device)
    fp = footprint(b, s.init_gauge > 0)
    host, dev = run_memory_need(fp, s, acc is not None)
    for terms, have, where in ((host, host_mem, "this machine's memory"), (dev, acc, f"the memory of {device}")):
        if have is not None and terms and sum(terms.values()) > have:
            key, value, text, advice = _term_text(max(terms, key=terms.get), b, s, fp)
            raise _refuse(key, value, f"{text}: the run needs at least {_gib(sum(terms.values()))}, more than {where} "
                                      f"({_gib(have)}); {advice}")


def _members_key(s: Settings) -> tuple[str, object, str]:
    """The sweep axis with the most values (what makes the members many), its values, and the members in words."""
    axes = s.sweep.axes()
    if not axes:
        return "sweep.mode", s.sweep.mode, "no sweep axis"
    axis = max(axes, key=lambda a: len(axes[a]))
    how = (" x ".join(f"sweep.{a}: {len(v)}" for a, v in axes.items()) if s.sweep.mode == "product" else
           f"sweep.mode='zip' over {list(axes)}")
    return f"sweep.{axis}", axes[axis], how


def sweep_memory_need(fp: tuple, s: Settings, n: int, nd: int, mpd: int, accelerator: bool,
                      nd_local: int | None = None) -> tuple[dict, dict]:
    """The bytes a sweep of ``n`` members (``fp``: a member's :func:`footprint`) over ``nd`` devices with ``mpd``
    members per device holds in this process: ``({term: bytes} on the host, {term: bytes} on one device)`` (CPU
    devices: every term is the host's; see the module's docstring).  ``nd_local``: the devices of this process (a
    multi-host sweep; default all), whose members it holds."""
    state, step, work = fp
    member = state + min(s.checkpoint.every, s.steps) * step
    local = nd if nd_local is None else nd_local
    size = mpd * nd
    padded = math.ceil(n / size) * size  # (the last group is padded with copies of members)
    held, held_padded = math.ceil(n * local / nd), padded * local // nd
    data = dataset_bytes(s)  # (replicated over the mesh: a copy on every device; CPU devices are the host's)
    if accelerator:
        return ({"members": held * member, "trajectory": s.steps * step},
                {"members": padded // nd * member, "step": mpd * work, "data": data})
    return ({"members": (held_padded + held) * member, "step": mpd * local * work, "trajectory": s.steps * step,
             "data": (local + 1) * data}, {})


def sweep_members_cap(b: Built, s: Settings, n: int, devices, requested: int, *, source: str = "",
                      regauge: bool = False, work: int | None = None, memory: int | None = None) -> int:
    """The most members per device, at most ``requested``, whose sweep fits this machine's memory (nothing is
    computed).

    Raises :class:`~quotient_sgd.config.ConfigError` naming the key when even one member per device does not fit
    (too many members: the longest sweep axis is named; too long a trajectory: ``steps``; a step too large to run
    on every device at once: the per-example gradients or the model's size; a data set whose copy on every device
    does not fit: the key that sizes it, e.g. ``data.n_train``), and when ``source`` (the key or
    argument that fixed ``requested``) asks for more members per device than fit (the message gives the most that
    do).  ``source=""``: ``requested`` bounds an automatic choice, and is lowered to what fits.  ``regauge``: whether
    the sweep's initialisation re-gauges (:func:`~._chunk.init_program`; its trace is then reused).  ``work``: the
    bytes a member's step was measured to hold (XLA's temporaries of the compiled chunk), when larger than the
    gradients counted."""
    nd = len(devices)
    host_mem = physical_memory() if memory is None else memory
    # (a multi-host sweep: this process holds the members of its own devices, and can read only their memory)
    local = [d for d in devices if d.process_index == jax.process_index()] or list(devices)
    accs = [device_memory(d) for d in local]
    accelerator = all(a is not None for a in accs)
    acc = min(accs) if accelerator else None
    fp = footprint(b, regauge)
    if work is not None and work > fp[2]:
        fp = (fp[0], fp[1], int(work))

    def over(m: int):
        host, dev = sweep_memory_need(fp, s, n, nd, m, accelerator, len(local))
        for terms, have, where in ((host, host_mem, "this machine's memory"),
                                   (dev, acc, f"the memory of a device ({local[0]})")):
            if have is not None and terms and sum(terms.values()) > have:
                return max(terms, key=terms.get), sum(terms.values()), have, where
        return None

    bad = over(1)
    if bad is not None:
        term, need, have, where = bad
        key, value, text, advice = _term_text(term, b, s, fp, n, sweep=True)
        raise _refuse(key, value, f"{text}: with one member per device on {nd} device(s) the sweep needs at least "
                                  f"{_gib(need)}, more than {where} ({_gib(have)}); {advice}")
    lo, hi = 1, max(1, requested)  # (the need grows with the members per device: the largest that fits)
    if over(hi) is None:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if over(mid) is None else (lo, mid)
    if source:
        _, need, have, where = over(requested)
        raise _refuse(source, requested,
                      f"{requested} members per device on {nd} device(s) run {requested * nd} members at once, and "
                      f"the sweep then needs at least {_gib(need)}, more than {where} ({_gib(have)}); at most {lo} "
                      f"per device might fit (use at most that, or 0: chosen from the measured cost among those that "
                      f"fit)")
    return lo
