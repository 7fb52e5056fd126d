"""Sweeps against their members' own runs, on cases the other sweep tests do not cover."""

import collections
import re
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from quotient_sgd.config import load_config, validate
from quotient_sgd.runner import build
from quotient_sgd.runner._chunk import single_programs
from quotient_sgd.runner._memory import state_shapes
from quotient_sgd.runner._sweep import _state_axes, sweep_programs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")

_LONE_MEMBERS = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
import numpy as np
from quotient_sgd.config import load_config, validate
from quotient_sgd.runner import load_trajectory, run, sweep, sweep_members
from quotient_sgd.runner._sweep import member_settings

c = load_config(sys.argv[1])
c.steps, c.checkpoint.every, c.logging.plots = 10, 10, False
c.sweep.lr, c.sweep.seed = (0.02, 0.1), (0,)
c.observables.names = ("loss", "grad_norm")
s = validate(c)
r = sweep(s, sys.argv[2] + "/sw", members_per_device=1, plots=False)
assert r.num_devices == 2
for i, m in enumerate(sweep_members(s)):
    own = run(member_settings(s, i, m), sys.argv[2] + f"/run{i}").trajectory
    got = load_trajectory(r.member_dirs[i])
    for k in own:
        for x, y in zip(jax.tree.leaves(got[k]), jax.tree.leaves(own[k])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"member {i}: {k}")
print("equal")
"""


@pytest.mark.slow
def test_one_member_per_device_over_several_devices_is_its_own_run_bit_for_bit(tmp_path):
    """The README says a member's per-step trajectory does not depend on the grouping or the device count, bit for
    bit on CPU.  One member per device over two or more devices (the first chunk of every multi-device sweep) ran
    the vmapped program over a member axis of length one on each device, which XLA (at its default optimisation
    level) compiles into other kernels than the unbatched program of a run: the tiny config's ``grad_norm``
    differed from the member's own ``run`` by 1.2e-7 relative and its curvature by 1.2e-5 (parameters and losses
    equal), while two members on a device, or one on one device, equalled it bit for bit.  Each device now runs a
    lone member through the unbatched program.  (In a subprocess: the tests compile at optimisation level 0, where
    the two programs happen to agree.)"""
    env = dict(os.environ, QSGD_COMPILATION_CACHE="off",
               XLA_FLAGS="--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    out = subprocess.run([sys.executable, "-c", _LONE_MEMBERS, TINY, str(tmp_path)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "equal" in out.stdout, out.stderr[-3000:]


def _primitives(jaxpr) -> collections.Counter:
    """How often each primitive occurs in ``jaxpr``, nested jaxprs included."""
    from jax.extend.core import jaxprs_in_params

    out = collections.Counter()
    for e in jaxpr.eqns:
        out[e.primitive.name] += 1
        for sub in jaxprs_in_params(e.params):
            out += _primitives(sub)
    return out


def test_a_lone_member_on_a_device_is_traced_as_its_own_run():
    """The fast half of the test above (which needs XLA's default optimisation level, in a subprocess): with one
    member per device over two devices, the sweep's chunk program computes on each device the unbatched computation
    of the run's program (every primitive the same number of times; only the member axis is taken off and put back),
    not a ``vmap`` over a member axis of length one."""
    c = load_config(TINY)
    c.observables.names = ("loss", "grad_norm")
    b = build(validate(c))
    state = state_shapes(b)
    own = _primitives(jax.make_jaxpr(single_programs(b, 5))(state, jnp.int32(0), None, b.dataset,
                                                             jnp.int32(0)).jaxpr)
    axes = _state_axes(b)
    group = jax.tree.map(lambda x, a: x if a is None else jax.ShapeDtypeStruct((2,) + x.shape, x.dtype), state,
                         axes, is_leaf=lambda x: x is None)
    mesh = Mesh(np.array(jax.devices()[:2]), ("sweep",))
    got = _primitives(jax.make_jaxpr(sweep_programs(b, 5, None, mesh))(group, jnp.zeros(2, jnp.int32), None,
                                                                      b.dataset, jnp.int32(0)).jaxpr)
    assert got["shard_map"] == 1, got
    reshaping = {"shard_map", "pjit", "squeeze", "broadcast_in_dim", "reshape", "expand_dims"}
    diff = {k: (got[k], own[k]) for k in set(got) | set(own) if k not in reshaping and got[k] != own[k]}
    assert not diff, diff


@pytest.mark.parametrize("call, kw, needle", [
    ("sweep", {"plots": "no"}, "sweep: plots='no' is not allowed"),
    ("sweep", {"max_chunks": -1}, "sweep: max_chunks=-1 is not allowed"),
    ("sweep", {"max_chunks": 2.5}, "sweep: max_chunks=2.5 is not allowed"),
    ("run", {"max_chunks": -1}, "run: max_chunks=-1 is not allowed"),
])
def test_bad_plots_and_max_chunks_are_named(tmp_path, call, kw, needle):
    """``sweep(..., plots="no")`` drew every plot (a truthy string), and ``max_chunks=-1`` computed nothing (2.5
    stopped after three chunks), without a word.  Each is now a ``ValueError`` naming the argument; nothing is
    written."""
    from quotient_sgd.runner import run, sweep

    c = load_config(TINY)
    c.steps = 2
    with pytest.raises(ValueError, match=re.escape(needle)):
        (sweep if call == "sweep" else run)(validate(c), str(tmp_path / "wd"), **kw)
    assert not (tmp_path / "wd").exists()
