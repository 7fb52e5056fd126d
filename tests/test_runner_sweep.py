"""Sweeps: 8-device sharding == 1 device == the member's own run; a diverging member is recorded while the
others finish; 2 processes x 4 CPU devices (jax.distributed on 127.0.0.1) == 1 process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import child_xla_flags, tiny_settings
from quotient_sgd.config import load_config, validate
from quotient_sgd.runner import run, sweep
from quotient_sgd.runner._sweep import member_settings, sweep_members

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _settings(**over):
    c = load_config(TINY)
    c.steps = 20
    c.logging.plots = False
    for k, v in over.items():
        c.update_from_flattened_dict({k: v})
    return validate(c)


def _traj(d):
    with np.load(os.path.join(d, "trajectory.npz")) as z:
        return {k: z[k] for k in z.files}


def _assert_same(a, b, rtol=1e-5, atol=1e-7):
    """Equal to float32 rounding: batched and unbatched programs order their sums differently, and a value that
    is a difference of larger ones (the step's curvature near 0) keeps only the rounding of the series' scale."""
    assert sorted(a) == sorted(b)
    for k in a:
        scale = np.max(np.abs(b[k]), initial=0.0, where=np.isfinite(b[k])) if np.size(b[k]) else 0.0
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=max(atol, 1e-6 * scale), err_msg=k)


def test_sharded_sweep_equals_one_device_and_single_runs(tmp_path):
    s = _settings()
    assert len(jax.devices()) == 8
    r8 = sweep(s, str(tmp_path / "d8"), members_per_device=1, plots=False)
    r1 = sweep(s, str(tmp_path / "d1"), members_per_device=8, devices=jax.devices()[:1], plots=False)
    assert (r8.num_devices, r1.num_devices, r8.num_members) == (8, 1, 8)
    for d8, d1 in zip(r8.member_dirs, r1.member_dirs):
        _assert_same(_traj(d8), _traj(d1))
    # a member equals the plain run of its settings
    i = 5
    ms = member_settings(s, i, sweep_members(s)[i])
    res = run(ms, str(tmp_path / "single"))
    _assert_same(_traj(r8.member_dirs[i]), res.trajectory)
    for d in r8.member_dirs:
        for f in ("config.json", "trajectory.npz", "metrics.jsonl", "events.json", "summary.md"):
            assert os.path.exists(os.path.join(d, f)), (d, f)
    assert "| 007 |" in open(tmp_path / "d8" / "summary.md").read()
    assert "8 devices in 1 process," in open(tmp_path / "d8" / "summary.md").read()
    assert "1 device in 1 process," in open(tmp_path / "d1" / "summary.md").read()


def test_diverging_member_recorded_others_finish(tmp_path):
    s = _settings(**{"sweep.lr": (0.05, 500.0), "sweep.seed": (0,), "steps": 30})
    r = sweep(s, str(tmp_path / "sw"), members_per_device=2, devices=jax.devices()[:1], plots=True)
    assert list(r.diverged) == [1]
    ok, bad = r.member_dirs
    assert len(_traj(ok)["loss"]) == 30 and np.isfinite(_traj(ok)["loss"]).all()
    events = json.load(open(os.path.join(bad, "events.json")))
    div = [e for e in events if e["kind"] == "divergence" and e["details"].get("ended_run")]
    assert len(div) == 1 and div[0]["step"] == r.diverged[1]["step"] < 30
    assert "non-finite" in div[0]["details"]["reason"]
    assert len(_traj(bad)["loss"]) == div[0]["step"] + 1
    table = open(tmp_path / "sw" / "summary.md").read()
    assert f"diverged at step {div[0]['step']}" in table
    for p in ("loss.png", "final.png"):
        assert os.path.getsize(tmp_path / "sw" / "plots" / p) > 1000


def test_single_run_divergence_ends_cleanly(tmp_path):
    res = run(_settings(**{"optim.lr": 500.0}), str(tmp_path / "r"))
    assert res.diverged is not None and res.diverged["step"] < 20
    events = json.load(open(tmp_path / "r" / "events.json"))
    assert any(e["kind"] == "divergence" and e["step"] == res.diverged["step"] for e in events)
    assert "diverged at step" in open(tmp_path / "r" / "summary.md").read()


def _free_port():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def _cli(args, env_extra, cwd):
    env = dict(os.environ, QSGD_NO_MALLOC_TUNING="1", XLA_FLAGS=child_xla_flags(), **env_extra)
    return subprocess.Popen([sys.executable, "-m", "quotient_sgd.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.xdist_group("multiprocess")  # never beside another multi-process test: their spinning
# collectives, oversubscribed on 2 cores, made each one 5-15x slower
def test_two_process_distributed_sweep_equals_single_process(tmp_path):
    common = ["sweep", f"--config={TINY}", "--config.steps=20", "--config.logging.plots=False",
              "--config.sweep.members_per_device=1"]
    port = _free_port()
    procs = [_cli(common + [f"--workdir={tmp_path / 'multi'}", f"--coordinator_address=127.0.0.1:{port}",
                            "--num_processes=2", f"--process_id={i}"], {"JAX_NUM_CPU_DEVICES": "4"}, tmp_path)
             for i in range(2)]
    # meanwhile, a second 2-process sweep on a directory in use (this process holds its lock) is refused by every
    # process: process 0 holds the directory's lock, and its refusal reaches process 1 (which waited for it in a
    # collective, then failed with a traceback once process 0 had exited)
    from quotient_sgd.runner._rundir import lock_directory, unlock_directory

    os.makedirs(tmp_path / "busy")
    lock = lock_directory(str(tmp_path / "busy"))
    port2 = _free_port()
    refused = [_cli(common + [f"--workdir={tmp_path / 'busy'}", f"--coordinator_address=127.0.0.1:{port2}",
                              "--num_processes=2", f"--process_id={i}"], {"JAX_NUM_CPU_DEVICES": "4"}, tmp_path)
               for i in range(2)]
    # the single-process reference: this process, 8 CPU devices, one member per device
    s = _settings(**{"sweep.members_per_device": 1})
    sweep(s, str(tmp_path / "single"), plots=False)
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    refused_outs = [p.communicate(timeout=240)[0] for p in refused]
    unlock_directory(lock)
    for i, (p, out) in enumerate(zip(refused, refused_outs)):
        assert p.returncode == 2 and "is in use" in out and "Traceback" not in out, (i, out[-3000:])
    assert "process 0: " in refused_outs[1]
    assert os.listdir(tmp_path / "busy") == []
    meta = json.load(open(tmp_path / "multi" / "sweep.json"))
    assert (meta["num_processes"], meta["num_devices"]) == (2, 8)
    for i in range(8):
        d = f"members/{i:03d}"
        _assert_same(_traj(tmp_path / "multi" / d), _traj(tmp_path / "single" / d), rtol=0, atol=0)


def _eqns(jaxpr, inside_cond=False):
    """``(eqn, inside a cond branch?)`` for every equation, nested jaxprs included."""
    from jax.extend.core import jaxprs_in_params

    for e in jaxpr.eqns:
        yield e, inside_cond
        for sub in jaxprs_in_params(e.params):
            yield from _eqns(sub, inside_cond or e.primitive.name == "cond")


def _vmapped_chunk_jaxpr(s, axes_fn):
    import functools

    import jax.numpy as jnp

    from quotient_sgd.runner._build import build
    from quotient_sgd.runner._chunk import chunk_step, init_program

    b = build(s)
    axes = axes_fn(b)
    init1 = init_program(b)
    # the state's shapes only (the jaxpr is traced, nothing runs): the init program is not compiled
    state1 = jax.eval_shape(init1, jnp.int32(0), jnp.float32(0), jnp.float32(0.05), jnp.float32(0), jnp.float32(0.9))
    state = jax.tree.map(lambda x, a: x if x is None else jax.ShapeDtypeStruct(x.shape if a is None else (4, *x.shape),
                                                                                 x.dtype),
                         state1, axes, is_leaf=lambda x: x is None)
    f = jax.vmap(functools.partial(chunk_step, b, 10, None), in_axes=(axes, 0, None, None, None),
                 out_axes=(axes, 0, 0))
    return jax.make_jaxpr(f)(state, jnp.arange(4, dtype=jnp.int32), None, b.dataset, jnp.int32(0)).jaxpr


def test_periodic_observables_stay_branches_under_vmap():
    """The step counters are unbatched in the vmapped chunk of a sweep: ``count % every`` and
    ``count % hessian_every`` stay ``cond`` s on a scalar predicate, so the Lanczos iteration (its ``eigh``) runs
    only inside a branch, not at every step for every member.  With the counters batched (the control), vmap turns
    the conds into ``select`` s of both branches and the ``eigh`` lands outside any branch."""
    from quotient_sgd.runner._sweep import _state_axes, _state_shapes

    s = _settings(**{"observables.every": 5, "observables.hessian_every": 10, "observables.lanczos_steps": 4})
    eqns = list(_eqns(_vmapped_chunk_jaxpr(s, _state_axes)))
    conds = [e for e, _ in eqns if e.primitive.name == "cond"]
    assert len(conds) >= 2 and all(e.invars[0].aval.shape == () for e in conds)
    eighs = [inside for e, inside in eqns if e.primitive.name == "eigh"]
    assert eighs and all(eighs), "the Hessian's Lanczos runs outside its cond branch"

    all_batched = lambda b: jax.tree.map(lambda x: 0, _state_shapes(b))  # noqa: E731
    control = list(_eqns(_vmapped_chunk_jaxpr(s, all_batched)))
    assert not all(inside for e, inside in control if e.primitive.name == "eigh")


def test_batch_size_sweep_members_equal_their_own_runs(tmp_path):
    """A sweep over batch sizes runs every member at the largest batch with the others masked (their batches are
    prefixes of the same random draw): each member equals the plain run of its own batch size up to float32
    summation order (one member of each batch size, one chunk)."""
    s = _settings(**{"steps": 12, "checkpoint.every": 12, "sweep.lr": (0.05,), "sweep.seed": (0,),
                     "sweep.batch_size": (8, 32)})
    r = sweep(s, str(tmp_path / "sw"), plots=False)
    members = sweep_members(s)
    assert sorted({m["batch_size"] for m in members}) == [8, 32]
    for i, m in enumerate(members):
        res = run(member_settings(s, i, m), str(tmp_path / f"run{i}"))
        _assert_same(_traj(r.member_dirs[i]), res.trajectory, rtol=1e-3, atol=1e-6)


def test_init_gauge_sweep_same_function_different_parameterisation(tmp_path):
    """Members that differ only in init_gauge start from one function in different parameterisations: equal loss
    and orbit-invariant grad_norm_canonical at step 0, a raw grad_norm changed several-fold."""
    s = _settings(**{"steps": 3, "sweep.lr": (0.05,), "sweep.seed": (0,), "sweep.init_gauge": (0.0, 2.0)})
    r = sweep(s, str(tmp_path / "sw"), plots=False)
    assert [m["init_gauge"] for m in sweep_members(s)] == [0.0, 2.0]
    a, b = (_traj(d) for d in r.member_dirs)
    np.testing.assert_allclose(b["loss"][0], a["loss"][0], rtol=1e-5)
    np.testing.assert_allclose(b["grad_norm_canonical"][0], a["grad_norm_canonical"][0], rtol=1e-4)
    ratio = b["grad_norm"][0] / a["grad_norm"][0]
    assert max(ratio, 1 / ratio) > 2, ratio


def test_init_without_regauging_is_the_same_state():
    """Runs whose members all start at init_gauge = 0 compile the initialisation without the random re-gauging:
    the state of the re-gauging program at scale 0 (what an init_gauge sweep's gauge-0 member gets) to float32
    rounding (XLA fuses the draws differently in the two programs), from a smaller program."""
    import jax.numpy as jnp

    from quotient_sgd.runner._build import build
    from quotient_sgd.runner._chunk import init_program

    b = build(_settings(**{"init_gauge": 0.0}))
    assert b.gauge_group is not None
    with_g, without = init_program(b, True), init_program(b, False)
    for seed in (0, 5):
        args = (jnp.int32(seed), jnp.float32(0), jnp.float32(0.05), jnp.float32(0), jnp.float32(0.9))
        a, c = jax.tree.leaves(with_g(*args)), jax.tree.leaves(without(*args))
        assert len(a) == len(c)
        for x, y in zip(a, c):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    count = lambda f: len(f.lower(*args).as_text())  # noqa: E731
    assert count(without) < count(with_g)


_CACHE_SCRIPT = """
import sys
import jax
import jax.numpy as jnp
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
from quotient_sgd.runner._sweep import compile_seconds

def f(x):
    for i in range(60):  # a program that takes a measurable time to compile
        x = jnp.sin(x) * (i + 1.0) + jnp.cumsum(x)
    return x

hits = []
jax.monitoring.register_event_listener(lambda event, **_: hits.append(event == "/jax/compilation_cache/cache_hits"))
lowered = jax.jit(f).lower(jnp.ones(37))
_, first = compile_seconds(lowered)
jax.clear_caches()
lowered = jax.jit(f).lower(jnp.ones(37))
hits.clear()
_, second = compile_seconds(lowered)  # served by the persistent cache
print(first, second, sum(hits))
"""


def test_compile_seconds_sees_through_the_persistent_cache(tmp_path):
    """The sweep's batching decision weighs the compile time of its first program: when JAX's persistent cache
    serves that program, compile_seconds reports the time its compilation took (JAX's saved-time event), not
    the load time, so the decision does not depend on what the cache holds."""
    import jax

    from quotient_sgd.runner._sweep import _SAVED_EVENT, compile_seconds

    class Fake:
        def compile(self):
            jax.monitoring.record_event_duration_secs(_SAVED_EVENT, 2.5)
            return "executable"

    out, seconds = compile_seconds(Fake())
    assert out == "executable" and 2.5 <= seconds < 3.5
    jax.monitoring.record_event_duration_secs(_SAVED_EVENT, 100.0)  # the listener is gone after the call
    assert compile_seconds(Fake())[1] < 3.5

    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    res = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, str(tmp_path / "cache")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    first, second, hits = map(float, res.stdout.split())
    assert hits == 1  # the second compilation came from the persistent cache
    assert first > 0.05 and 0.5 * first <= second <= 2 * first + 0.5, (first, second)


def _counting_programs(monkeypatch):
    """Record the start step of every chunk program call a sweep makes (one per group and chunk)."""
    from quotient_sgd.runner import _sweep as sweep_module

    calls = []
    compile_seconds = sweep_module.compile_seconds

    def counting(lowered):
        f, seconds = compile_seconds(lowered)

        def call(*args):
            calls.append(int(np.asarray(args[-1])))
            return f(*args)

        return call, seconds

    monkeypatch.setattr(sweep_module, "compile_seconds", counting)
    return calls


def test_sweep_stops_when_no_member_is_live(tmp_path, monkeypatch):
    """Every member diverges in the first chunk: the sweep computes no further chunk (it used to dispatch the
    next chunk before reading the divergences of the previous one), keeps no checkpoint after it, and records
    each member's divergence (step, reason) as the member's own run does."""
    calls = _counting_programs(monkeypatch)
    s = tiny_settings(30, **{"sweep.lr": (500.0, 800.0), "sweep.seed": ()})
    wd = str(tmp_path / "sw")
    r = sweep(s, wd, members_per_device=1, devices=jax.devices()[:1])
    assert sorted(r.diverged) == [0, 1] and all(d["step"] < 10 for d in r.diverged.values())
    assert calls == [0, 0]  # the first chunk of each member only
    assert r.steps_done == 10 and sorted(int(x) for x in os.listdir(os.path.join(wd, "checkpoints"))) == [10]
    for i, d in enumerate(r.member_dirs):
        own = run(member_settings(s, i, sweep_members(s)[i]), str(tmp_path / f"run{i}"))
        assert own.diverged == r.diverged[i]
        events = json.load(open(os.path.join(d, "events.json")))
        assert events == json.load(open(tmp_path / f"run{i}" / "events.json"))
        assert len(_traj(d)["loss"]) == own.diverged["step"] + 1
    # run again: nothing is computed
    calls.clear()
    assert sweep(s, wd, members_per_device=1, devices=jax.devices()[:1]).diverged == r.diverged
    assert calls == []


def test_diverged_member_is_not_run_in_the_next_chunk(tmp_path, monkeypatch):
    """One member per device, run one at a time: the member that diverged in the first chunk is not run in the
    second (the other finishes)."""
    calls = _counting_programs(monkeypatch)
    s = tiny_settings(30, **{"sweep.lr": (0.05, 500.0), "sweep.seed": ()})
    r = sweep(s, str(tmp_path / "sw"), members_per_device=1, devices=jax.devices()[:1])
    assert list(r.diverged) == [1] and r.diverged[1]["step"] < 10
    assert calls == [0, 0, 10, 20]
    assert len(_traj(r.member_dirs[0])["loss"]) == 30
