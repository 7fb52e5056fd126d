"""Batched programs compiled with XLA's default flags compute what their members compute alone.

The test process compiles with faster flags (tests/conftest.py: optimisation level 0, fusion emitters off), so a
miscompilation that only XLA:CPU's default pipeline makes is invisible to the rest of the suite; these checks run
in a subprocess with XLA's defaults (what the CLI and users run).  Found this way: under ``jax.vmap`` over 4 float64
members, the scatter-adds that assembled a rescale chain's M-matrix (``symmetry._reduced.m_matrix``) were
miscompiled by the fusion emitters, and the vertical projection of member 2 of 4 came out 1.4% off."""

import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax.flatten_util import ravel_pytree
    from quotient_sgd.symmetry import Product, Rescale, Translation

    def init(seed, sizes, batch):
        # the members' parameters drawn on the host (drawn by JAX, op by op under these flags, they took half the
        # run's time); with the scatter-add M-matrix the vertical projection of this data was 12% off for a member
        r = np.random.default_rng(seed)
        return {f"l{i}": {"kernel": r.standard_normal((batch, a, b)) / np.sqrt(a),
                          "bias": 0.1 * r.standard_normal((batch, b))}
                for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}

    def group(n, translation):
        comps = [Rescale(incoming=(((f"l{i}", "kernel"), 1), ((f"l{i}", "bias"), 0)),
                         outgoing=(((f"l{i + 1}", "kernel"), 0),), name=f"r{i}") for i in range(n - 1)]
        if translation:
            comps.append(Translation(kernel=(f"l{n - 1}", "kernel"), bias=(f"l{n - 1}", "bias"), name="t"))
        return Product(comps)

    worst = 0.0
    # (the slow variant, tests/test_xla_defaults.py -m slow, adds a logit translation, canonicalize and 8 members)
    cases = (((3, 5, 4, 3), False, 4),) + ((((3, 5, 4, 3), True, 4), ((4, 6, 5, 2), False, 8)) if SLOW else ())
    for sizes, translation, batch in cases:
        G = group(len(sizes) - 1, translation)
        ps, us = init(0, sizes, batch), init(1, sizes, batch)
        fs = (lambda p, u: ravel_pytree(G.vertical(p, u))[0],) + ((lambda p, u: ravel_pytree(G.canonicalize(p))[0],)
                                                                 if SLOW else ())
        for f in fs:
            a = np.asarray(jax.jit(jax.vmap(f))(ps, us))
            one = jax.jit(f)
            b = np.stack([np.asarray(one(jax.tree.map(lambda x: x[i], ps), jax.tree.map(lambda x: x[i], us)))
                          for i in range(batch)])
            worst = max(worst, float(np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1))))
    print("WORST", worst)
    """
)


def _check(slow):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # XLA's defaults (quotient_sgd adds only its scheduler setting)
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", f"SLOW = {slow}\n" + CHILD], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    worst = float([ln for ln in out.stdout.splitlines() if ln.startswith("WORST")][0].split()[1])
    assert worst < 1e-10, f"a batched member differs from the same member alone by {worst:.3g} (relative)"


def test_vmapped_rescale_chain_projection_equals_its_members_under_xla_default_flags():
    _check(False)


@pytest.mark.slow
def test_vmapped_rescale_chain_projection_equals_its_members_under_xla_default_flags_slow():
    _check(True)
