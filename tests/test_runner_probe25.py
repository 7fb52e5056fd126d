"""Sweeps across several processes (jax.distributed on 127.0.0.1): what the processes of one launch must agree on."""

import os
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import child_xla_flags
from quotient_sgd.config import ConfigError, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _settings(**over):
    c = load_config(TINY)
    c.steps = 20
    for k, v in over.items():
        c.update_from_flattened_dict({k: v})
    return validate(c)


def _two_processes(monkeypatch, calls):
    """``_same_call_everywhere(calls[i])`` in two threads standing for processes 0 and 1, their allgather a
    barrier; what each raised (``None``: nothing)."""
    import jax
    from jax.experimental import multihost_utils

    from quotient_sgd.runner import _sweep

    barrier, slots, local = threading.Barrier(2, timeout=30), [None, None], threading.local()

    def allgather(x):
        slots[local.i] = np.asarray(x)
        barrier.wait()
        out = np.stack(slots)
        barrier.wait()
        return out

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "devices", lambda *a: [SimpleNamespace(process_index=p) for p in (0, 0, 1, 1)])
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    raised = [None, None]

    def proc(i):
        local.i = i
        try:
            _sweep._same_call_everywhere(calls[i])
        except Exception as e:  # noqa: BLE001
            raised[i] = e

    threads = [threading.Thread(target=proc, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return raised


def _call(settings, workdir="/shared/sw", **args):
    return {"config": settings.to_dict(), "workdir": workdir, "members_per_device": None, "plots": None,
            "max_chunks": None, "devices": None, **args}


def test_processes_started_with_different_settings_are_refused_in_every_process(monkeypatch):
    """Two processes of one sweep given different overrides (process 1: ``--config.optim.momentum=0.5``) ran one
    mixed sweep: the members on process 1's devices trained with momentum 0.5 (their config.json said so) while
    ``sweep.json`` and the table recorded process 0's 0.9, exit status 0 in both; different ``--workdir`` values
    split the sweep over two directories.  Every process now refuses it, naming the key and both values."""
    s = _settings()
    assert _two_processes(monkeypatch, [_call(s), _call(s)]) == [None, None]
    raised = _two_processes(monkeypatch, [_call(s), _call(_settings(**{"optim.momentum": 0.5}))])
    for e in raised:
        assert isinstance(e, ConfigError), raised
        assert "process 1: config.optim.momentum = 0.5 (process 0: 0.9)" in str(e), e
    raised = _two_processes(monkeypatch, [_call(s), _call(s, "/shared/other", max_chunks=2)])
    for e in raised:
        assert isinstance(e, ConfigError), raised
        assert "workdir = '/shared/other' (process 0: '/shared/sw')" in str(e) and "max_chunks = 2" in str(e), e


def _free_port():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def _cli(args, devices, cwd):
    env = dict(os.environ, QSGD_NO_MALLOC_TUNING="1", XLA_FLAGS=child_xla_flags(), JAX_NUM_CPU_DEVICES=str(devices))
    return subprocess.Popen([sys.executable, "-m", "quotient_sgd.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _outputs(procs, timeout=240):
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
@pytest.mark.xdist_group("multiprocess")
def test_two_process_launch_with_different_overrides_writes_nothing(tmp_path):
    """The command-line case of the test above: exit status 2 in both processes, no traceback, nothing written."""
    port = _free_port()
    common = ["sweep", f"--config={TINY}", "--config.steps=10", "--config.logging.plots=False",
              f"--workdir={tmp_path / 'sw'}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    procs = [_cli(common + ["--process_id=0"], 2, tmp_path),
             _cli(common + ["--process_id=1", "--config.optim.momentum=0.5"], 2, tmp_path)]
    outs = _outputs(procs)
    for p, out in zip(procs, outs):
        assert p.returncode == 2 and "Traceback" not in out, out[-3000:]
        assert "config.optim.momentum = 0.5 (process 0: 0.9)" in out, out[-3000:]
    assert not os.path.exists(tmp_path / "sw")


def test_processes_with_different_device_counts_are_refused_in_every_process(monkeypatch):
    """Two processes with 1 and 3 CPU devices failed in a traceback in both (JAX's allgather lays the devices out
    as processes x local devices: "cannot reshape array of size 4 into shape (2,1)"); each process now refuses it
    from the device list they all see, naming every process's count, before any collective."""
    import jax

    from quotient_sgd.runner import _sweep

    fake = [SimpleNamespace(process_index=p) for p in (0, 1, 1, 1)]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "devices", lambda *a: fake)
    with pytest.raises(ConfigError, match=r"different numbers of devices \(process 0: 1, process 1: 3\)"):
        _sweep._same_call_everywhere(_call(_settings()))


def test_a_coordinator_nobody_listens_on_is_named_within_the_wait(monkeypatch):
    """Processes 1 and 1 of two (no process 0 started; or an address no coordinator listens on) waited 300 s in
    jax.distributed.initialize, whose client then ended both with SIGABRT (status -6) and a C++ stack trace.  A
    process other than 0 now waits for the coordinator's port itself (as long as JAX would) and, when nothing
    accepts a connection there, names the address and what to check, without calling JAX."""
    import jax

    from quotient_sgd import cli

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(cli, "_COORDINATOR_WAIT_S", 1.0)
    with socket.socket() as sk:  # (a port nothing listens on)
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
        fv = SimpleNamespace(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=1,
                             distributed=False)
        msg = cli._init_distributed(fv)
        assert not calls and msg is not None, msg
        assert f"process 1 found no coordinator at --coordinator_address=127.0.0.1:{port} within 1 s" in msg, msg
        sk.listen(1)
        assert cli._init_distributed(fv) is None and len(calls) == 1
