"""Host-memory policy for XLA:CPU steps: keep freed buffers in the process instead of unmapping them.

XLA:CPU allocates every step's temporaries afresh (one large block per execution plus the outputs). glibc's
``malloc`` serves blocks above its mmap threshold (at most 32 MiB) with ``mmap`` and returns them with ``munmap``,
so each step faults its whole working set in again, one 4 KiB page at a time, with the kernel zeroing every
page. On the 2-core benchmark machine that was ~42,000 page faults and ~85 ms of system time per step of
config A (≈ 20% of the step). With ``M_MMAP_MAX = 0`` every block comes from the heap, and with a high
``M_TRIM_THRESHOLD`` freed heap memory stays mapped, so the next step reuses pages that are already resident.
The cost: the process keeps its peak heap size until it exits, as a caching allocator would.

What ``mallopt`` alone cannot reach: with asynchronous dispatch (JAX's default), XLA:CPU runs a step, and allocates
its temporaries (one block of the whole step's scratch: 170 MB for config A, ≈600 MB for B), on a worker thread,
which glibc serves from a per-thread arena. Such an arena grows in heaps of at most 64 MiB, and glibc maps anything
larger with ``mmap`` whatever ``M_MMAP_MAX`` says, and unmaps it on free. So that block was faulted in again at
every step (B bf16: 145,000 faults and ≈300 ms of system time per ~1 s step). Hence "retain" also turns JAX's CPU
asynchronous dispatch off (``jax_cpu_enable_async_dispatch``): a single-device computation then runs inline on the
calling thread, its scratch comes from the main heap, and it stays resident like every other block (B bf16: 0 faults
and ≈10 ms of system time per step; configs A and B, fp32 and bf16, 6–14% faster on the Intel machine kind). Nothing
is lost by it: the training loop waits for every step's loss anyway, and computations over several devices keep
their worker threads (JAX applies the flag to single-device computations only). It takes effect for CPU clients
created afterwards, so apply the policy before the first computation, as ``xlstm-eqx train`` and the benchmarks do.

Started with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (:data:`HUGE_PAGE_TUNABLE`; glibc ≥ 2.35 reads it at process
start only), glibc asks for transparent huge pages (kernel mode ``madvise`` or ``always``) for every block it maps or
grows the heap by: fewer TLB misses in the step's memory-bound loops (B bf16 another ≈4%), and 2 MiB pages for the
blocks that worker threads still map (multi-device steps, or async dispatch under "release"). The Makefile's
``train``, ``bench`` and ``bench-compare`` set it; :func:`malloc_uses_huge_pages` says whether this process has it.

Only glibc (Linux) is affected; elsewhere :func:`configure_host_memory` does nothing and says so. The policy is
process-wide and can only be set, not scoped; ``xlstm-eqx train``, the lm-eval adapter (when lm-eval builds the
model from its arguments) and the benchmark scripts apply it at start.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Literal

import jax

ENV_VAR = "XLSTM_EQX_HOST_MEMORY"
POLICIES = ("retain", "release")
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int: bytes of free heap top kept before trimming
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def configure_host_memory(policy: Literal["retain", "release"] | None = None) -> str:
    """Applies a host-memory policy to this process; returns what is in force.

    ``policy``: "retain" keeps freed blocks in the heap and runs single-device CPU computations inline on the
    calling thread (faster repeated steps on CPU); "release" changes nothing (glibc's defaults and JAX's
    asynchronous dispatch, unless something set them before). None reads ``$XLSTM_EQX_HOST_MEMORY``
    (default "retain"). Returns "retain", "release", or "unsupported" when the C library is not glibc.
    """
    if policy is None:
        policy = os.environ.get(ENV_VAR, "retain").strip().lower()  # type: ignore[assignment]
    if policy not in POLICIES:
        raise ValueError(f"{ENV_VAR} / host-memory policy must be one of {POLICIES}, got {policy!r}")
    if policy == "release":
        return "release"
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return "unsupported"
    if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER) != 1:
        raise OSError("glibc mallopt refused the host-memory settings")
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # the step's scratch then comes from the main heap
    return "retain"


def malloc_uses_huge_pages() -> bool:
    """Whether this process was started with :data:`HUGE_PAGE_TUNABLE` in ``$GLIBC_TUNABLES`` (colon-separated)."""
    return HUGE_PAGE_TUNABLE in (item.strip() for item in os.environ.get("GLIBC_TUNABLES", "").split(":"))


def huge_page_advice(backend: str) -> str | None:
    """A hint to start with :data:`HUGE_PAGE_TUNABLE`: for the CPU backend on Linux without it, else None."""
    if backend != "cpu" or not sys.platform.startswith("linux") or malloc_uses_huge_pages():
        return None
    return (
        f"start the process with GLIBC_TUNABLES={HUGE_PAGE_TUNABLE} (as `make train` does) for faster steps: "
        "XLA:CPU's buffers then come in 2 MiB pages (fewer TLB misses, and far fewer page faults for the scratch "
        "that multi-device steps map afresh at every step)"
    )
