"""Host-memory policy for XLA:CPU steps: keep freed buffers in the process instead of unmapping them.

XLA:CPU allocates every step's temporaries afresh (one large block per execution plus the outputs). glibc's
``malloc`` serves blocks above its mmap threshold (at most 32 MiB) with ``mmap`` and returns them with ``munmap``,
so each step faults its whole working set in again, one 4 KiB page at a time, with the kernel zeroing every
page. On the 2-core benchmark machine that was ~42,000 page faults and ~85 ms of system time per step of
config A (≈ 20% of the step). With ``M_MMAP_MAX = 0`` every block comes from the heap, and with a high
``M_TRIM_THRESHOLD`` freed heap memory stays mapped, so the next step reuses pages that are already resident.
The cost: the process keeps its peak heap size until it exits, as a caching allocator would.

Only glibc (Linux) is affected; elsewhere :func:`configure_host_memory` does nothing and says so. The policy is
process-wide and can only be set, not scoped; ``xlstm-eqx train``, the lm-eval adapter (when lm-eval builds the
model from its arguments) and the benchmark scripts apply it at start.
"""

from __future__ import annotations

import ctypes
import os
from typing import Literal

ENV_VAR = "XLSTM_EQX_HOST_MEMORY"
POLICIES = ("retain", "release")
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's <malloc.h>
_M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int: bytes of free heap top kept before trimming


def configure_host_memory(policy: Literal["retain", "release"] | None = None) -> str:
    """Applies a host-memory policy to this process; returns what is in force.

    ``policy``: "retain" keeps freed blocks in the heap (faster repeated steps on CPU); "release" changes
    nothing (glibc's defaults unless something set them before). None reads ``$XLSTM_EQX_HOST_MEMORY``
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
    return "retain"
