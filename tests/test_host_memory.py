"""The host-memory policy: under "retain", a freed large block is reused without faulting its pages in again."""

import json
import subprocess
import sys

import pytest

from xlstm_eqx import configure_host_memory

# Allocates (plain malloc, as XLA:CPU does; numpy would ask for huge pages), touches and frees a 64 MiB block (above
# glibc's largest mmap threshold) five times and reports the minor page faults of each round after the first.
PROBE = """
import ctypes, json, resource, sys
from xlstm_eqx import configure_host_memory
policy = configure_host_memory(sys.argv[1])
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 * 2**20)
    libc.memset(block, 1, 64 * 2**20)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"policy": policy, "faults": faults[1:]}))
"""
PAGES = 64 * 2**20 // 4096


def _probe(policy: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, policy], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the policy acts on glibc only")
def test_retained_blocks_are_reused_without_page_faults():
    released = _probe("release")
    if min(released["faults"]) < PAGES // 2:
        pytest.skip("premise: freed blocks fault in again by default (not so with transparent huge pages always on)")
    retained = _probe("retain")
    assert retained["policy"] == "retain"
    assert max(retained["faults"]) < PAGES // 100, retained


def test_unknown_policy_names_the_variable(monkeypatch):
    monkeypatch.setenv("XLSTM_EQX_HOST_MEMORY", "sometimes")
    with pytest.raises(ValueError, match="XLSTM_EQX_HOST_MEMORY.*'sometimes'"):
        configure_host_memory()
    monkeypatch.setenv("XLSTM_EQX_HOST_MEMORY", "Release")
    assert configure_host_memory() == "release"
