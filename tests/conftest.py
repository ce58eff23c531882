"""Test-wide settings: 8 fake CPU devices, strict dtype promotion, a PRNG key fixture.

Runtime shape/type checking of the whole package is switched on by jaxtyping's pytest hook
(``--jaxtyping-packages=xlstm_eqx,beartype.beartype`` in pyproject.toml's addopts).
"""

import os

# Must happen before JAX initialises its CPU backend (the jaxtyping plugin may already have imported jax).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import itertools  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


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
