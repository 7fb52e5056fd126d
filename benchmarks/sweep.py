"""Wall time of a 16-member sweep vs 16 sequential runs of the same members, in one process.

    python benchmarks/sweep.py [--steps N] [--only quickstart|mlp784]

Models: the quickstart config (MLP 64-32-10 on digits, quotient observables every 10 steps, Hessian every 100)
and a compute-bound 784-256-256-10 ReLU MLP at batch 128 (teacher-student data, symmetry observables off) whose
single step already fills the cores.  Both sides run the same members (4 seeds x 4 learning rates), write their
run directories with plots off (plots cost the same per member on both sides), and the sequential runs have
checkpoints off (a sweep does not checkpoint).  Compilation is included on both sides (the sequential loop
compiles once: hyperparameters are injected and seeds traced).  Prints ratio = sequential / sweep (> 1: the
sweep is faster).  Target: >= 4x for quickstart; >= 1x (never slower) for every model.
"""

from __future__ import annotations

import argparse
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


def measure(cfg, tmp):
    s = validate(cfg)
    s = dataclasses.replace(s, logging=dataclasses.replace(s.logging, progress=False, plots=False))
    members = sweep_members(s)
    t = time.perf_counter()
    for i, m in enumerate(members):
        ms = member_settings(s, i, m)
        ms = dataclasses.replace(ms, checkpoint=dataclasses.replace(ms.checkpoint, enabled=False))
        run(ms, os.path.join(tmp, "seq", f"{i:03d}"))
    t_seq = time.perf_counter() - t
    t = time.perf_counter()
    res = sweep(s, os.path.join(tmp, "sweep"), plots=False)
    t_sweep = time.perf_counter() - t
    return t_seq, t_sweep, res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--only", default=None)
    a = ap.parse_args()
    print(f"devices: {jax.devices()}")
    for name, make in (("quickstart", quickstart), ("mlp784", mlp784)):
        if a.only and a.only != name:
            continue
        tmp = tempfile.mkdtemp()
        try:
            t_seq, t_sweep, res = measure(make(a.steps), tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"{name:>10}: 16 sequential runs {t_seq:7.1f} s | 16-member sweep {t_sweep:7.1f} s "
              f"({res.members_per_device} member(s)/device on {res.num_devices} device(s)) | "
              f"ratio {t_seq / t_sweep:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
