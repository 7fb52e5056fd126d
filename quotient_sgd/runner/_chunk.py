"""The jitted unit of work: one scan chunk of training plus evaluation, for one run or vmapped over members.

The training state of a run is ``(params, opt_state, model_state)``; ``model_state`` is the model's
non-parameter state (BatchNorm's running statistics), ``None`` for models without one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import data as qdata
from ..optim import set_hyperparams, train
from ._batches import batch_fn
from ._build import Built, batch_key, init_model


def _finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def chunk_step(b: Built, num_steps: int, padded_batch: int | None, state, seed, batch_size, dataset, start_step):
    """``num_steps`` steps of ``quotient_sgd.optim.train`` from ``start_step``, then the test / train evaluation.

    ``state = (params, opt_state, model_state)``.  ``batch_size`` is a traced per-member value only when a sweep
    varies it (``padded_batch`` is then the largest batch: smaller ones are masked prefixes); otherwise the
    configured static batch size is used.  Returns ``(state, trajectory, evaluation)``."""
    params, opt_state, model_state = state
    bs = b.settings.data.batch_size
    if padded_batch is not None:
        bf = batch_fn(dataset, batch_size, max_batch_size=padded_batch)
    else:
        bf = batch_fn(dataset, bs if bs > 0 else None)
    kw = dict(num_steps=num_steps, key=batch_key(seed), opt_state=opt_state, start_step=start_step,
              example_loss_fn=b.example_loss_fn, donate=False)
    if b.stateful:
        params, opt_state, model_state, traj = train(b.loss_fn, params, b.tx, bf, model_state=model_state,
                                                     act_on_model_state=b.act_on_model_state, **kw)
    else:
        params, opt_state, traj = train(b.loss_fn, params, b.tx, bf, **kw)
    return (params, opt_state, model_state), traj, evaluation(b, params, model_state, dataset)


def evaluation(b: Built, params, model_state, dataset) -> dict:
    """The evaluation a chunk ends with, of the state it ends at: ``test_<k>`` and ``train_<k>`` for every value of
    ``b.eval_fn`` on the whole split (loss, accuracy), and ``params_finite``.  A pure function of the state:
    :func:`eval_program` computes it again from a checkpoint of that step."""
    ev = {f"test_{k}": v for k, v in b.eval_fn(params, qdata.full_batch(dataset, "test"), model_state).items()}
    ev.update({f"train_{k}": v for k, v in b.eval_fn(params, qdata.full_batch(dataset, "train"), model_state).items()})
    ev["params_finite"] = _finite(params)
    return ev


@functools.lru_cache(maxsize=32)
def eval_program(b: Built):
    """Jitted ``evaluate(state, dataset) -> evaluation`` of one run (:func:`evaluation` of ``state = (params,
    opt_state, model_state)``): the evaluation of a chunk's end computed again from the state at that step, e.g. a
    ``metrics.jsonl`` row lost before the newest checkpoint.  The same traced computation as the chunk's, on the
    same parameters: equal to it bit for bit on CPU (checked for the MLP, the CNN with and without BatchNorm and
    the Transformer)."""
    return jax.jit(lambda state, dataset: evaluation(b, state[0], state[2], dataset))


def init_state(b: Built, seed, init_gauge, hyper: dict):
    """``(params, opt_state, model_state)`` of one member: init, optional re-gauging (none when ``init_gauge`` is
    ``None``), hyperparameters set in the optimiser state."""
    params, model_state = init_model(b, seed, init_gauge)
    opt_state = b.tx.init(params)
    if hyper:
        opt_state = set_hyperparams(opt_state, **hyper)
    return params, opt_state, model_state


def hyper(b: Built, lr, wd, mom) -> dict:
    """The injected hyperparameters of the optimiser state (:func:`~._build.make_inner_optimizer`)."""
    h = {"learning_rate": lr, "weight_decay": wd}
    if b.settings.optim.name == "sgd":
        h["momentum"] = mom
    return h


def hyper_of(s) -> tuple:
    return (jnp.float32(s.optim.lr), jnp.float32(s.optim.weight_decay), jnp.float32(s.optim.momentum))


@functools.lru_cache(maxsize=32)
def init_program(b: Built, regauge: bool = True):
    """Jitted ``init(seed, gauge, lr, wd, momentum) -> state`` of one member (seeds and hyperparameters are
    inputs: a loop over them compiles once).  ``regauge=False``, for runs and sweeps whose every member starts at
    ``init_gauge = 0``, leaves the random re-gauging out of the program (the identity at scale 0): the same
    values to float32 rounding (XLA fuses the random draws differently in the two programs), and about half the
    compile time of the initialisation."""
    def init(seed, gauge, lr, wd, mom):
        return init_state(b, seed, gauge if regauge else None, hyper(b, lr, wd, mom))

    return jax.jit(init)


@functools.lru_cache(maxsize=32)
def single_programs(b: Built, num_steps: int):
    """Jitted ``chunk(state, seed, batch_size, dataset, start)`` of ``num_steps`` steps for one run (cached per
    Built and chunk length: seeds and hyperparameters are inputs, so a loop over them compiles once)."""
    return jax.jit(functools.partial(chunk_step, b, num_steps, None))


@jax.jit
def _concat_by_dtype(leaves: tuple) -> dict:
    out: dict[str, list] = {}
    for x in leaves:
        out.setdefault(jnp.dtype(x.dtype).name, []).append(jnp.ravel(x))
    return {k: jnp.concatenate(v) for k, v in out.items()}


def to_host(tree):
    """``tree`` as numpy arrays.  A chunk's outputs are ~100 small arrays; fetching each costs a fixed ~40 us, so
    the numeric leaves that this process can address are concatenated on device (one array per dtype and set of
    devices) and come over in one transfer each, then split into views."""
    return to_host_finish(to_host_start(tree))


def to_host_start(tree):
    """The device half of :func:`to_host`: dispatches the concatenations and returns a handle for
    :func:`to_host_finish`.  Dispatched right after the program that computes ``tree``, the concatenations run
    before whatever is dispatched next, so the fetch does not wait for that (a pipeline writes chunk ``k`` while
    chunk ``k + 1`` computes)."""
    leaves, treedef = jax.tree.flatten(tree)
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(leaves):
        if (isinstance(x, jax.Array) and x.is_fully_addressable
                and (jnp.issubdtype(x.dtype, jnp.number) or x.dtype == jnp.bool_)):
            groups.setdefault(tuple(sorted(d.id for d in x.sharding.device_set)), []).append(i)
    cats = [(idx, _concat_by_dtype(tuple(leaves[i] for i in idx))) for idx in groups.values()]
    return leaves, treedef, cats


def to_host_finish(handle):
    """The numpy tree of a :func:`to_host_start` handle."""
    leaves, treedef, cats = handle
    out = [None] * len(leaves)
    for idx, cat in cats:
        flat = jax.device_get(cat)
        offsets: dict[str, int] = {}
        for i in idx:
            x = leaves[i]
            name = jnp.dtype(x.dtype).name
            a = offsets.get(name, 0)
            out[i] = flat[name][a:a + x.size].reshape(x.shape)
            offsets[name] = a + x.size
    for i, x in enumerate(leaves):
        if out[i] is None:
            out[i] = np.asarray(x)
    return jax.tree.unflatten(treedef, out)
