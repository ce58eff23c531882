"""Test-wide settings: 8 fake CPU devices, strict dtype promotion, a PRNG key fixture.

Runtime shape/type checking of the whole package is switched on by jaxtyping's pytest hook
(``--jaxtyping-packages=xlstm_eqx,beartype.beartype`` in pyproject.toml's addopts).
"""

import atexit
import os
import shutil
import tempfile

# Must happen before JAX initialises its CPU backend (the jaxtyping plugin may already have imported jax).
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # xdist workers inherit it
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# A compilation cache for this run only, empty at the start and removed at exit, so every run compiles as a clean
# clone does. Many tests (and the subprocesses of the job, resume and multi-process tests, which inherit these
# variables) compile the same small programs and eager ops again; the cache turns the repeats into reads. Under
# pytest-xdist the controller's conftest runs before it starts the workers, so they inherit its directory and share
# it; only the process that made the directory removes it. The step programs are cached too: their token-id check
# (eqx.error_if, a host callback, which the persistent cache refuses) is a small program of its own.
# Do not lower XLA's backend optimisation level to compile faster: with jax 0.10.2, levels 0 and 1 gave NaN
# gradients for a two-block float64 model (test_execution_policies_do_not_change_results) whose gradients are
# finite at the default level and op by op.
_CACHE_OWNER = "XLSTM_EQX_TEST_JAX_CACHE_OWNER_PID"
if _CACHE_OWNER not in os.environ:
    os.environ[_CACHE_OWNER] = str(os.getpid())
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="xlstm_eqx_test_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")

import itertools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
# jax may have read the environment before this module ran
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


@pytest.fixture
def getkey():
    """Call ``getkey()`` for a fresh, deterministic PRNG key."""
    counter = itertools.count()
    base = jax.random.key(0)
    return lambda: jax.random.fold_in(base, next(counter))


@pytest.fixture
def x64():
    """Runs the test body with 64-bit floats enabled (exact-math checks)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Slices of real plays: 3 train files, 1 validation, 1 test (small enough to train on in seconds)."""
    from xlstm_eqx.data.corpus import default_corpus

    root = tmp_path_factory.mktemp("corpus")
    works = default_corpus("train")[:3] + default_corpus("validation")[:1] + default_corpus("test")[:1]
    names = ["train_a", "train_b", "train_c", "val", "test"]
    for name, path in zip(names, works):
        (root / f"{name}.txt").write_text(path.read_text()[: 12_000 if name.startswith("train") else 3_000])
    return root


@pytest.fixture(scope="module")
def tiny_module():
    """loop_setup's one-device setup (state, train_step, eval_step, schedule, static, tx), built once per module."""
    from loop_setup import setup

    return setup(total_steps=16)


@pytest.fixture
def tiny(tiny_module):
    """A fresh copy of the state per test: fit consumes (donates) the state it is given."""
    state, *rest = tiny_module
    return (jax.tree.map(jnp.copy, state), *rest)
