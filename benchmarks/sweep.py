"""Wall time of a 16-member sweep vs 16 sequential runs of the same members, in one process.

    python benchmarks/sweep.py [--steps N] [--only quickstart|mlp784] [--warm] [--cli]

Models: the quickstart config (MLP 64-32-10 on digits, quotient observables every 10 steps, Hessian every 100)
and a compute-bound 784-256-256-10 ReLU MLP at batch 128 (teacher-student data, symmetry observables off) whose
single step already fills the cores.  Both sides run the same members (4 seeds x 4 learning rates) with the
config's checkpointing (every 100 steps) and write their run directories with plots off (plots cost the same per
member on both sides).  Every compilation cache is cleared before each side, so compilation counts on both (the
sequential loop compiles once: hyperparameters are injected and seeds traced; the sweep compiles its programs
and measures its members per device).  JAX's persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``) is
off while the sides are timed, and what a process pays once whatever it runs first (importing orbax, tensorstore
and the rest of what a run loads on first use, LAPACK's initialisation) is paid before either side, by an untimed
run and sweep of a two-step, two-unit variant of the config.  Prints ratio = sequential / sweep (> 1: the sweep is
faster), and each pass's own grouping of the sweep's members.
``--warm`` repeats each side
with its programs already compiled (the ratio of the running time alone).  ``--cli`` also times what a user
types: 16 ``quotient-sgd run`` commands one after the other (each process imports, compiles and runs one member)
against one ``quotient-sgd sweep`` command, each side with a compilation cache of its own that starts empty (a
``JAX_COMPILATION_CACHE_DIR`` of the environment is not passed on: the CLI would use it for both sides).
Target: >= 4x for quickstart; >= 1x (never slower) for every model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import shutil
import tempfile
import time

import jax

from quotient_sgd.config import load_config, quickstart_path, validate
from quotient_sgd.runner import run, sweep
from quotient_sgd.runner._sweep import member_settings, sweep_members


def quickstart(steps):
    c = load_config(quickstart_path())
    c.steps = steps
    c.sweep.seed = (0, 1, 2, 3)
    c.sweep.lr = (0.03, 0.1, 0.2, 0.3)
    return c


def mlp784(steps):
    c = quickstart(steps)
    c.name = "mlp784"
    c.model.hidden = (256, 256)
    c.data.name = "teacher_student"
    c.data.din = 784
    c.data.dout = 10
    c.data.n_train = 2048
    c.data.n_test = 256
    c.data.batch_size = 128
    c.symmetry.enabled = False
    c.observables.hessian_every = 0
    c.sweep.lr = (0.003, 0.01, 0.02, 0.03)
    return c


def clear_caches():
    from quotient_sgd.runner import _build, _chunk, _sweep

    jax.clear_caches()
    for f in (_build._build, _chunk.init_program, _chunk.single_programs, _sweep.sweep_programs,
              _sweep.plain_step_flops, _sweep._state_shapes):
        f.cache_clear()
    _sweep._COMPILE_S.clear()


def _quiet(s):
    """``s`` with the progress bars and plots off (plots cost the same per member on both sides)."""
    return dataclasses.replace(s, logging=dataclasses.replace(s.logging, progress=False, plots=False))


def warm_up(cfg, tmp):
    """Pay, untimed, what this process pays once whatever it runs first, so that neither side is charged for it:
    one ``run`` and one 2-member ``sweep`` of ``cfg`` cut to 2 steps and 2 hidden units without the Hessian
    (they compile in seconds: the first run imports orbax, tensorstore and ~580 other modules, 1.1 s of the
    sequential side's cold time as measured here, which the sweep, timed second, got for free) and one LAPACK
    call (jaxlib initialises LAPACK, importing ``scipy.linalg``, on the first lowering of one: the Hessian's)."""
    import jax.numpy as jnp

    w = copy.deepcopy(cfg)
    w.steps = 2
    w.model.hidden = (2,)
    w.observables.hessian_every = 0
    w.sweep.seed = (0, 1)
    w.sweep.lr = (tuple(cfg.sweep.lr) or (cfg.optim.lr,))[:1]
    s = _quiet(validate(w))
    run(member_settings(s, 0, sweep_members(s)[0]), os.path.join(tmp, "warm-up-run"))
    sweep(s, os.path.join(tmp, "warm-up-sweep"), plots=False)
    jax.block_until_ready(jax.jit(jnp.linalg.eigh)(jnp.eye(2)))


@contextlib.contextmanager
def no_persistent_cache():
    """JAX's persistent compilation cache off inside (restored after): a ``JAX_COMPILATION_CACHE_DIR`` set in the
    environment served the sweep programs the sequential side had written (its initialisation), and every program
    to both sides on a second invocation, so that "cold" measured no compilation.  JAX decides whether to use the
    cache at a process's first compilation: call this before anything compiles."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


def measure(cfg, tmp, repeats=1):
    """Seconds of 16 sequential runs and of the 16-member sweep: the first of ``repeats`` passes of each side
    after clearing every compilation cache (cold), then passes with that side's programs compiled; and the
    sweep's result of each pass (its grouping of the members is decided anew in each).  The process's one-time
    costs are paid first (:func:`warm_up`); call it under :func:`no_persistent_cache`."""
    s = _quiet(validate(cfg))
    members = sweep_members(s)
    warm_up(cfg, tmp)
    t_seq, t_sweep, results = [], [], []
    clear_caches()
    for r in range(repeats):
        t = time.perf_counter()
        for i, m in enumerate(members):
            run(member_settings(s, i, m), os.path.join(tmp, f"seq-{r}", f"{i:03d}"))
        t_seq.append(time.perf_counter() - t)
    clear_caches()
    for r in range(repeats):
        t = time.perf_counter()
        res = sweep(s, os.path.join(tmp, f"sweep-{r}"), plots=False)
        t_sweep.append(time.perf_counter() - t)
        results.append(res)
    return t_seq, t_sweep, results


_CLI_CONFIG = """
from quotient_sgd.config import quickstart_path
import importlib.util

def get_config():
    spec = importlib.util.spec_from_file_location("q", quickstart_path())
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.steps = {steps}
    c.sweep.seed = (0, 1, 2, 3)
    c.sweep.lr = (0.03, 0.1, 0.2, 0.3)
    c.logging.plots = False
    c.logging.progress = False
    return c
"""


#: Environment variables through which JAX reads its persistent compilation cache's settings.
_JAX_CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE",
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def measure_cli(steps, tmp):
    """Seconds of 16 ``quotient-sgd run`` processes (the members of the quickstart sweep, one after the other)
    and of one ``quotient-sgd sweep`` process, each side with a fresh compilation cache."""
    import subprocess
    import sys

    cfg = os.path.join(tmp, "cli_quickstart.py")
    with open(cfg, "w") as f:
        f.write(_CLI_CONFIG.format(steps=steps))
    cmd = [sys.executable, "-m", "quotient_sgd.cli"]
    # each side starts from an empty compilation cache of its own (the CLI keeps one): the sequential runs after
    # the first load their programs from it, as a user's would
    # (JAX's own cache variables are dropped: the CLI keeps a JAX_COMPILATION_CACHE_DIR it finds, for both sides)
    base = {k: v for k, v in os.environ.items() if k not in _JAX_CACHE_VARIABLES}
    env = {side: dict(base, QSGD_COMPILATION_CACHE=os.path.join(tmp, f"cache-{side}")) for side in ("seq", "sweep")}
    t = time.perf_counter()
    for i, (seed, lr) in enumerate((s, lr) for s in (0, 1, 2, 3) for lr in (0.03, 0.1, 0.2, 0.3)):
        subprocess.run([*cmd, "run", f"--config={cfg}", f"--config.seed={seed}", f"--config.optim.lr={lr}",
                        f"--workdir={os.path.join(tmp, 'cli-seq', f'{i:03d}')}"], check=True, capture_output=True,
                       env=env["seq"])
    t_seq = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([*cmd, "sweep", f"--config={cfg}", f"--workdir={os.path.join(tmp, 'cli-sweep')}"], check=True,
                   capture_output=True, env=env["sweep"])
    return t_seq, time.perf_counter() - t


MODELS = ("quickstart", "mlp784")


def _steps(value: str) -> int:
    """``--steps``: an integer >= 1 (``--steps 0`` failed in the config's validation, naming ``config.steps``)."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: allowed an integer >= 1 (training steps per member)")
    return n


def main(argv=None):
    """Refuses, naming the option and what is allowed, before anything is measured: ``--only foo`` measured
    nothing and exited 0, and ``--cli`` with ``--only mlp784`` (the command-line comparison runs the quickstart
    config) was skipped without a word."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=_steps, default=600)
    ap.add_argument("--only", default=None, choices=MODELS)
    ap.add_argument("--warm", action="store_true", help="also time both sides with compiled programs")
    ap.add_argument("--cli", action="store_true", help="also time 16 `quotient-sgd run` vs one `quotient-sgd sweep` "
                    "(the quickstart config)")
    a = ap.parse_args(argv)
    if a.cli and a.only not in (None, "quickstart"):
        ap.error(f"--cli times the quickstart config's commands; with --only {a.only} it would time nothing: drop "
                 f"--cli or use --only quickstart")
    print(f"devices: {jax.devices()}")
    for name, make in zip(MODELS, (quickstart, mlp784)):
        if a.only and a.only != name:
            continue
        tmp = tempfile.mkdtemp()
        try:
            with no_persistent_cache():
                t_seq, t_sweep, results = measure(make(a.steps), tmp, 2 if a.warm else 1)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for k, label in enumerate(("cold", "compiled")[: len(t_seq)]):
            res = results[k]
            grouping = ", then ".join(f"{e['members_per_device']}/device from step {e['from_step']}"
                                      for e in res.schedule)
            print(f"{name:>10} ({label:>8}): 16 sequential runs {t_seq[k]:6.1f} s | 16-member sweep "
                  f"{t_sweep[k]:6.1f} s ({grouping}; {res.num_devices} device(s)) | ratio "
                  f"{t_seq[k] / t_sweep[k]:5.2f}x", flush=True)
    if a.cli:
        tmp = tempfile.mkdtemp()
        try:
            t_seq, t_sweep = measure_cli(a.steps, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"quickstart (     cli): 16 `quotient-sgd run` {t_seq:6.1f} s | one `quotient-sgd sweep` "
              f"{t_sweep:6.1f} s | ratio {t_seq / t_sweep:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
