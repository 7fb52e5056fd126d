"""The programs a run compiles do not depend on the interpreter: the same lowered text whatever PYTHONHASHSEED.

A set of parameter paths iterated while tracing made the summation order of a canonicalisation's norm (and so
the program, its rounding, and the key of the persistent compilation cache) differ from one process to the next.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = """
import hashlib, sys
import jax
import jax.numpy as jnp
from quotient_sgd.config import load_config, validate
from quotient_sgd.runner._build import build
from quotient_sgd.runner._chunk import init_program, single_programs
for path in sys.argv[1:]:
    c = load_config(path)
    c.observables.hessian_every = 5
    b = build(validate(c))
    args = (jnp.int32(0), jnp.float32(0), jnp.float32(0.1), jnp.float32(0), jnp.float32(0.9))
    init = init_program(b, True)
    state = jax.eval_shape(init, *args)  # the step program is lowered for the state's shapes: nothing compiles
    for text in (init.lower(*args).as_text(),
                 single_programs(b, 10).lower(state, jnp.int32(0), None, b.dataset, jnp.int32(0)).as_text()):
        print(hashlib.sha1(text.encode()).hexdigest())
"""


# the quickstart in the fast suite; its BatchNorm CNN and Transformer siblings in the slow one
@pytest.mark.parametrize("names", [
    ("quickstart",),
    pytest.param(("digits_bn_cnn", "grokking"), marks=pytest.mark.slow),
], ids=["quickstart", "cnn_transformer"])
def test_lowered_programs_do_not_depend_on_the_hash_seed(names):
    configs = [os.path.join(ROOT, "configs", f"{n}.py") for n in names]
    out = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        env.pop("XLA_FLAGS", None)
        res = subprocess.run([sys.executable, "-c", _SCRIPT, *configs], env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        out.append(res.stdout.split())
    assert len(out[0]) == 2 * len(configs)
    assert out[0] == out[1]
