"""A sweep over 2 processes x 4 CPU devices (jax.distributed on 127.0.0.1) regroups its members after the first
chunk and resumes from its checkpoints like a single-process sweep: interrupted after the first chunk (before the
regroup, checkpoint in the one-member-per-device layout) and again after the regroup (checkpoint in the batched
layout), and restarted each time with the same command, it ends with the trajectories of an uninterrupted
single-process sweep over 8 devices (bitwise, CPU) and every metric row exactly once."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import assert_sweeps_bitwise, checkpoint_steps, child_xla_flags, load_trajectory
from quotient_sgd.config import load_config, validate
from quotient_sgd.runner import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")

#: 20 members (10 seeds x 2 learning rates) on 8 devices: up to 3 per device, the last group of the
#: one-per-device layout padded; 4 chunks of 10 steps.
OVERRIDES = {"steps": 40, "checkpoint.every": 10, "logging.plots": False, "sweep.members_per_device": 0,
             "sweep.seed": tuple(range(10)), "sweep.lr": (0.02, 0.05)}
#: The forced choice after the first chunk: every member of a device in one vmapped group.
FORCED_MPD = 3
NUM_MEMBERS = 20

# One process of the multi-host sweep: 4 CPU devices, jax.distributed, and (flag) the choice of members per
# device forced to FORCED_MPD.  Prints one line ``RESULT {json}``.
WORKER = r'''
import json, sys
args = json.loads(sys.argv[1])
import quotient_sgd  # sets XLA_FLAGS before the backend starts
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(coordinator_address=args["coordinator"], num_processes=2, process_id=args["process_id"])
from quotient_sgd.config import load_config, validate
from quotient_sgd.runner import _sweep, sweep

calls = []
if args["force_mpd"]:
    def choose(**kw):
        calls.append(kw["remaining_chunks"])
        return args["force_mpd"], {"forced": True}
    _sweep.choose_members_per_device = choose
c = load_config(args["config"])
for k, v in args["overrides"].items():
    c.update_from_flattened_dict({k: tuple(v) if isinstance(v, list) else v})
r = sweep(validate(c), args["workdir"], max_chunks=args["max_chunks"], plots=False)
assert (jax.process_count(), len(jax.devices()), len(jax.local_devices())) == (2, 8, 4)
print("RESULT " + json.dumps({"resumed_from": r.resumed_from, "steps_done": r.steps_done, "choose_calls": calls,
                              "members_per_device": r.members_per_device, "schedule": r.schedule,
                              "num_devices": r.num_devices}), flush=True)
'''


def _settings():
    c = load_config(TINY)
    for k, v in OVERRIDES.items():
        c.update_from_flattened_dict({k: v})
    return validate(c)


def _free_port():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def _start_two_processes(worker, workdir, max_chunks, cwd):
    """The same command in 2 processes (a fresh coordinator each time)."""
    port = _free_port()
    env = dict(os.environ, QSGD_NO_MALLOC_TUNING="1", XLA_FLAGS=child_xla_flags())
    env.pop("JAX_NUM_CPU_DEVICES", None)
    procs = []
    for i in range(2):
        args = {"coordinator": f"127.0.0.1:{port}", "process_id": i, "config": TINY, "overrides": OVERRIDES,
                "workdir": workdir, "max_chunks": max_chunks, "force_mpd": FORCED_MPD}
        procs.append(subprocess.Popen([sys.executable, worker, json.dumps(args)], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _results(procs):
    """Wait for the processes of :func:`_start_two_processes`; their ``RESULT`` dicts."""
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        assert len(lines) == 1, out[-4000:]
        results.append(json.loads(lines[0][len("RESULT "):]))
    return results


# (slow: test_runner_sweep.py::test_two_process_distributed_sweep_equals_single_process runs two processes and
# test_runner_sweep_resume.py resumes sweeps in the fast suite)
@pytest.mark.slow
@pytest.mark.xdist_group("multiprocess")  # never beside another multi-process test: their spinning
# collectives, oversubscribed on 2 cores, made each one 5-15x slower
def test_two_process_sweep_regroups_and_resumes_bitwise(tmp_path, monkeypatch):
    from quotient_sgd.runner import _sweep

    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    wd = str(tmp_path / "multi")
    schedule = [{"from_step": 0, "members_per_device": 1}, {"from_step": 10, "members_per_device": FORCED_MPD}]

    # 1. the first chunk only, one member per device: the (forced) decision to batch is recorded, the
    # checkpoint of step 10 holds the members in the one-per-device layout
    procs = _start_two_processes(str(worker), wd, 1, str(tmp_path))

    # the reference, while the workers start: this process, 8 CPU devices, uninterrupted, the same choice
    try:
        monkeypatch.setattr(_sweep, "choose_members_per_device", lambda **kw: (FORCED_MPD, {"forced": True}))
        assert len(jax.devices()) == 8
        ref = sweep(_settings(), str(tmp_path / "single"), plots=False)
        assert (ref.schedule, ref.num_devices, ref.num_members) == (schedule, 8, NUM_MEMBERS)
        # ... and its regroup moved every member's state: it equals a sweep batched from the start (up to the
        # rounding of a different program)
        fixed = sweep(_settings(), str(tmp_path / "fixed"), members_per_device=FORCED_MPD, plots=False)
        assert fixed.schedule == [{"from_step": 0, "members_per_device": FORCED_MPD}]
        for a, b in zip(ref.member_dirs, fixed.member_dirs):
            ta, tb = load_trajectory(a), load_trajectory(b)
            for k in ta:
                np.testing.assert_allclose(ta[k], tb[k], rtol=1e-5, atol=1e-6, err_msg=f"{a}: {k}")
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise

    for r in _results(procs):
        assert (r["resumed_from"], r["steps_done"], r["members_per_device"]) == (0, 10, 1)
        assert r["choose_calls"] == [3] and r["schedule"] == schedule
    meta = json.load(open(os.path.join(wd, "sweep.json")))
    assert (meta["num_processes"], meta["num_devices"], meta["schedule"], meta["decided"]) == (2, 8, schedule, True)
    assert checkpoint_steps(wd) == [10]
    assert not os.path.exists(os.path.join(wd, "summary.md"))

    # what a kill during the next chunk leaves behind in a member written by each process (members 0-3 live on
    # the devices of process 0, 4-7 on those of process 1): that chunk's part files and metric rows, a torn line
    for m in ("000", "005"):
        d = os.path.join(wd, "members", m)
        np.savez(os.path.join(d, "trajectory_parts", "part_000000010.npz"), loss=np.zeros(10))
        with open(os.path.join(d, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": 10, "loss": -1.0}) + "\n" + '{"step": 15, "lo')

    # 2. the same command resumes from step 10, regroups the members (3 per device) and stops after two chunks:
    # the checkpoint of step 30 holds them in the batched layout
    for r in _results(_start_two_processes(str(worker), wd, 2, str(tmp_path))):
        assert (r["resumed_from"], r["steps_done"], r["members_per_device"]) == (10, 30, FORCED_MPD)
        assert r["choose_calls"] == [] and r["schedule"] == schedule  # decided once, in the first run
    assert checkpoint_steps(wd)[-1] == 30

    # 3. the same command again resumes from step 30, in the batched layout, and finishes
    for r in _results(_start_two_processes(str(worker), wd, None, str(tmp_path))):
        assert (r["resumed_from"], r["steps_done"], r["members_per_device"]) == (30, 40, FORCED_MPD)
        assert r["choose_calls"] == []
    assert os.path.exists(os.path.join(wd, "summary.md"))

    for i in range(NUM_MEMBERS):
        assert len(load_trajectory(os.path.join(wd, "members", f"{i:03d}"))["loss"]) == 40, f"member {i}"
    assert_sweeps_bitwise(wd, os.path.join(tmp_path, "single"), NUM_MEMBERS)
