"""Test configuration: 8 CPU devices, strict dtype/rank promotion, float64 on request."""

import os

# the CLI's persistent compilation cache stays off in tests (each test compiles what it checks; concurrent
# workers would share one directory); tests/test_cli_run.py turns it on in its own directory
os.environ["QSGD_COMPILATION_CACHE"] = "off"

# The suite is compile-bound (most tests trace and compile small programs once), so it compiles with three XLA:CPU
# options that trade run time for compile time: the backend (LLVM) optimisation level 0, XLA:CPU's elemental
# fusion emitters instead of its MLIR fusion emitters, and code generation in one piece (no split of each module
# for parallel compilation threads, which two xdist workers on two cores only contend for).  Measured here on the
# same tests, the first cut the suite's wall time by ~25%, the second halved what remained (e.g. three optimiser /
# Hessian / HJ-gradient test files: 145 s -> 74 s on one core), the third took 5-13% of the CPU time of
# compile-heavy files (the whole suite 11.8 -> 10.7 min).  The CLI subprocesses the tests start drop XLA_FLAGS, so
# they compile with XLA's defaults, except where their results are compared bitwise with this process
# (tests.helpers.child_xla_flags).  An option already in XLA_FLAGS is kept:
# XLA_FLAGS="--xla_backend_optimization_level=3 --xla_cpu_use_fusion_emitters=true
# --xla_cpu_parallel_codegen_split_count=32" runs the suite with XLA's defaults.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
                  "--xla_cpu_parallel_codegen_split_count=1")
for _flag in TEST_XLA_FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import quotient_sgd  # noqa: E402,F401  (sets XLA_FLAGS before the backend starts; see quotient_sgd/__init__.py)
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import gc  # noqa: E402

# A test process keeps what JAX traces and compiles (its caches grow to ~10^6 tracked objects within a few test
# files), and Python's cyclic garbage collector scans all of them at each of its full (oldest-generation)
# collections, by default after every 10 collections of the middle generation.  Measured in one process on nine
# test files (201 tests): 15 full collections took 17.7 s, against 5 taking 1.9 s with a full collection after
# every 100 middle ones (CPU time of the run 117.7 -> 103.4 s, peak memory 3.58 -> 3.60 GB); on five others (166
# tests) 12 took 4.6-6.7 s, against one of 0.6 s.  Young garbage is still collected as often; the oldest generation
# is collected explicitly after each test module, and what survives it frozen (_free_compiled_programs below).
gc.set_threshold(700, 10, 100)

import pytest  # noqa: E402
from xdist_crashes import (  # noqa: E402,F401  (a crashed xdist worker: rerun its test once, never hang)
    pytest_handlecrashitem,
    pytest_report_teststatus,
    pytest_terminal_summary,
    pytest_xdist_make_scheduler,
)


def _memory_mappings() -> tuple[int, int] | None:
    """``(mappings this process holds, the most it may hold)`` on Linux, else None."""
    try:
        with open("/proc/self/maps", "rb") as f:
            held = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
    except (OSError, ValueError):
        return None
    return held, limit


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after a test module once the process holds half the memory mappings it may.

    Every program XLA:CPU compiles is loaded into its own memory mappings (code, constants, data: ~6 for a small
    jitted function), and JAX's caches keep the program, and so its mappings, for the life of the process.  One
    xdist worker compiles thousands of programs over the suite; it reached 63.5k mappings near the end of the run,
    against Linux's limit of 65530 a process (``vm.max_map_count``), where an ``mmap`` fails ("LLVM compilation
    error: Cannot allocate memory") and XLA's compiler segfaults.  ``jax.clear_caches()`` frees the programs and
    their mappings.  Clearing after every module kept a worker under ~8k mappings but recompiles what modules share
    (the suite took 10.7 min on an idle machine, against 8.7-10.0 this way), so it is done only past half the limit
    (once or twice a worker, a run).
    """
    yield
    mappings = _memory_mappings()
    if mappings is not None and mappings[0] > mappings[1] // 2:
        gc.unfreeze()  # (what the caches held may now be cyclic garbage: let the collection below see it)
        jax.clear_caches()
    # What a module leaves alive (mostly JAX's caches) is moved out of the collector's sight (``gc.freeze``), so that
    # the full collections of later modules scan only what those create.  Measured in one process on ten test
    # files (201 tests): full collections 13.9 s -> 0.9 s, plus 2.0 s for these ten collections (the process's
    # CPU time 369 -> 357 s).  Freezing keeps nothing alive; a frozen cycle is collected after the next unfreeze.
    gc.collect()
    gc.freeze()


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (``jax.enable_x64``)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def getkey():
    """A fresh PRNG key per call: ``k = getkey()``."""
    counter = iter(range(10**9))

    def _get():
        return jax.random.key(next(counter))

    return _get
