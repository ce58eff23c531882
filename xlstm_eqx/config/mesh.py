"""Device mesh configuration: data, fully-sharded-data and tensor ("model") parallel axis sizes."""

from __future__ import annotations

from dataclasses import dataclass

from .parsing import ConfigError


@dataclass(frozen=True)
class MeshConfig:
    """Axis sizes of the ``('data', 'fsdp', 'model')`` mesh; ``data = -1`` takes all remaining devices.

    ``fsdp_min_weight_size``: parameters with fewer elements stay replicated over ``fsdp`` (sharding tiny
    tensors costs more in communication than it saves in memory).
    """

    data: int = -1
    fsdp: int = 1
    model: int = 1
    fsdp_min_weight_size: int = 2**18

    def __post_init__(self):
        if self.data == 0 or self.data < -1:
            raise ConfigError("data", f"must be a positive size or -1 (all remaining devices), got {self.data}")
        for name in ("fsdp", "model"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be ≥ 1, got {getattr(self, name)}")
        if self.fsdp_min_weight_size < 0:
            raise ConfigError("fsdp_min_weight_size", f"must be ≥ 0, got {self.fsdp_min_weight_size}")
