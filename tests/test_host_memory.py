"""The host-memory policy: under "retain", a freed large block is reused without faulting its pages in again."""

import json
import os
import subprocess
import sys

import pytest

from xlstm_eqx import configure_host_memory, malloc_uses_huge_pages
from xlstm_eqx.host_memory import HUGE_PAGE_TUNABLE, huge_page_advice

PAGES_64_MIB = 64 * 2**20 // 4096

# Allocates (plain malloc, as XLA:CPU does; numpy would ask for huge pages), touches and frees a block of argv[2]
# MiB five times, on the main thread or on a new one (argv[3]), and reports the minor page faults of each round
# after the first.
PROBE = """
import ctypes, json, resource, sys, threading
from xlstm_eqx import configure_host_memory
policy = configure_host_memory(sys.argv[1])
size = int(sys.argv[2]) * 2**20
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []
def rounds():
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        libc.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
if sys.argv[3] == "thread":
    worker = threading.Thread(target=rounds)
    worker.start()
    worker.join()
else:
    rounds()
print(json.dumps({"policy": policy, "faults": faults[1:]}))
"""


# Runs a jitted computation whose scratch holds an argv[2]-MiB temporary (a layer's activations, (1024, n) float32)
# five times after a warm-up, and reports the minor page faults of each run after the first, and whether dispatch
# was asynchronous.
JIT_PROBE = """
import json, resource, sys
from xlstm_eqx import configure_host_memory
policy = configure_host_memory(sys.argv[1])
import jax, jax.numpy as jnp
x, w = jnp.ones((1024, 64)), jnp.ones((64, int(sys.argv[2]) * 256))
step = jax.jit(lambda x, w: (jnp.tanh(x @ w) @ w.T).sum())
step(x, w).block_until_ready()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"policy": policy, "faults": faults[1:], "async": jax.config.read('jax_cpu_enable_async_dispatch')}))
"""


def _run_probe(script: str, *args: str, env: dict[str, str]) -> dict:
    """The JSON line ``script`` prints, run in a fresh interpreter: glibc's tunables and JAX's CPU client are fixed
    at process start. ``env`` is added to this process's environment."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})  # fmt: skip
    return json.loads(out.stdout)


def _probe(policy: str, mib: int = 64, on: str = "main", tunables: str = "") -> dict:
    return _run_probe(PROBE, policy, str(mib), on, env={"GLIBC_TUNABLES": tunables})


def _transparent_huge_pages() -> str:
    """The kernel's THP mode ('always', 'madvise' or 'never'), '' where it cannot be read."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the policy acts on glibc only")
def test_retained_blocks_are_reused_without_page_faults():
    released = _probe("release")
    if min(released["faults"]) < PAGES_64_MIB // 2:
        pytest.skip("premise: freed blocks fault in again by default (not so with transparent huge pages always on)")
    retained = _probe("retain")
    assert retained["policy"] == "retain"
    assert max(retained["faults"]) < PAGES_64_MIB // 100, retained


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the tunable acts on glibc only")
def test_huge_page_tunable_covers_blocks_a_worker_thread_maps():
    """A worker thread's block above 64 MiB (XLA:CPU's step scratch) is mapped afresh every time even under
    "retain"; with HUGE_PAGE_TUNABLE it comes in 2 MiB pages, faulting ~500x less often."""
    if _transparent_huge_pages() not in ("madvise", "always"):
        pytest.skip("the kernel's transparent huge pages are off")
    pages = 128 * 2**20 // 4096
    plain = _probe("retain", mib=128, on="thread")
    if min(plain["faults"]) < pages // 2:
        pytest.skip("premise: a worker thread's large block faults in again every time (not so here)")
    huge = _probe("retain", mib=128, on="thread", tunables=HUGE_PAGE_TUNABLE)
    assert max(huge["faults"]) < pages // 100, huge


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the policy acts on glibc only")
def test_retain_runs_steps_inline_so_their_scratch_stays_resident():
    """XLA:CPU's per-execution scratch above 64 MiB: mapped afresh at every run from a worker thread's arena under
    JAX's asynchronous dispatch, whatever mallopt says; under "retain" the run is inline and its scratch comes from
    the main heap, which keeps it."""
    one_device = {"GLIBC_TUNABLES": "", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    released, retained = (_run_probe(JIT_PROBE, policy, "96", env=one_device) for policy in ("release", "retain"))
    assert released["async"] and not retained["async"]
    pages = 96 * 2**20 // 4096
    if min(released["faults"]) < pages // 2:
        pytest.skip("premise: the scratch faults in again at every run by default (not so with huge pages always)")
    # Over all four runs, less than a quarter of one scratch's pages: faulting it in again even once would exceed
    # that (other threads of the process may fault a few pages meanwhile, so no single run is held to zero).
    assert sum(retained["faults"]) < pages // 4, retained


def test_huge_page_tunable_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1")
    assert malloc_uses_huge_pages()
    for value in ("", "glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=10"):
        monkeypatch.setenv("GLIBC_TUNABLES", value)
        assert not malloc_uses_huge_pages(), value


def test_huge_page_advice_only_for_a_cpu_backend_without_the_tunable(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("GLIBC_TUNABLES", "")
    assert HUGE_PAGE_TUNABLE in huge_page_advice("cpu")
    assert huge_page_advice("gpu") is None
    monkeypatch.setenv("GLIBC_TUNABLES", HUGE_PAGE_TUNABLE)
    assert huge_page_advice("cpu") is None
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("GLIBC_TUNABLES", "")
    assert huge_page_advice("cpu") is None


def test_unknown_policy_names_the_variable(monkeypatch):
    monkeypatch.setenv("XLSTM_EQX_HOST_MEMORY", "sometimes")
    with pytest.raises(ValueError, match="XLSTM_EQX_HOST_MEMORY.*'sometimes'"):
        configure_host_memory()
    monkeypatch.setenv("XLSTM_EQX_HOST_MEMORY", "Release")
    assert configure_host_memory() == "release"
