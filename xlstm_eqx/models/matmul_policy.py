"""Which GEMM runs a bfloat16 × bfloat16 → float32 product: the low-precision one, or float32 on upcast operands.

Both give the same numbers up to summation order: a product of two bfloat16 values is exact in float32, so
converting the operands to float32 first changes nothing but the kernel. What differs is speed. With bfloat16
dot instructions (AVX-512 BF16 or AMX on x86, FEAT_BF16 on Arm, and every GPU/TPU) the low-precision GEMM is
about twice as fast as float32. Without them (a plain AVX2 CPU) XLA:CPU emulates it and is slower than its
float32 GEMM: on a 2-core AVX2 EPYC the bf16 train step ran at 0.68× (config A) and 0.67× (config B) of the
float32 one, and at 0.98× / 0.96× once its products were upcast (``benchmarks/variants.py``, see
benchmarks/README.md).
"""

from __future__ import annotations

import functools

import jax

from ..config.model import LowPrecisionMatmul

# CPU feature names (as /proc/cpuinfo spells them) of bfloat16 dot-product instructions: x86's AVX-512 BF16 and
# AMX-BF16, aarch64's FEAT_BF16.
BF16_DOT_CPU_FEATURES = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def upcasts_low_precision_matmul(
    policy: LowPrecisionMatmul, backend: str | None = None, cpu_features: frozenset[str] | None = None
) -> bool:
    """Whether ``policy`` runs low-precision products as float32 GEMMs on upcast operands.

    ``"native"``: never; ``"upcast"``: always; ``"auto"``: on a CPU backend whose processor lacks every
    feature in :data:`BF16_DOT_CPU_FEATURES`. ``backend`` defaults to ``jax.default_backend()`` and
    ``cpu_features`` to this host's (:func:`host_cpu_features`); an unreadable feature list keeps the native GEMM.
    """
    if policy == "native":
        return False
    if policy == "upcast":
        return True
    if policy != "auto":
        raise ValueError(f"low_precision_matmul must be one of 'auto', 'native', 'upcast', got {policy!r}")
    if (backend or jax.default_backend()) != "cpu":
        return False
    features = host_cpu_features() if cpu_features is None else cpu_features
    return bool(features) and not features & BF16_DOT_CPU_FEATURES


@functools.cache
def host_cpu_features() -> frozenset[str]:
    """The first processor's feature flags in /proc/cpuinfo ("flags" on x86, "Features" on aarch64); empty where
    that file is missing or has neither line (e.g. macOS)."""
    fields = cpuinfo_fields(("flags", "Features"))
    return frozenset(next(iter(fields.values()), "").split())


def cpuinfo_fields(keys: tuple[str, ...]) -> dict[str, str]:
    """{key: value} of the first processor's /proc/cpuinfo lines named in ``keys`` (those present; {} without
    that file)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, sep, value = line.partition(":")
                if sep and key.strip() in keys:
                    fields.setdefault(key.strip(), value.strip())
                if line.strip() == "" and fields:  # the first processor's block ends at a blank line
                    break
    except OSError:
        pass
    return fields
