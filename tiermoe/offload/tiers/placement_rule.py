"""Where an expert runs this step (the accelerator tier's rule, also driven by the simulator): on the device if
resident, copied there if that is cheaper than CPU compute or the tier has room, else on the CPU. Plain functions of
a cost model: no torch."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Where(Enum):
    DEVICE = "device"  # resident on the accelerator
    PROMOTE = "promote"  # copy to the accelerator now, then run there
    HOST = "host"  # run on the CPU from the RAM tier


@dataclass(frozen=True, slots=True)
class DeviceCosts:
    """Throughputs that decide placement (profile once per machine; see `profile_costs`)."""

    cpu_flops: float  # FLOP/s of an expert's matmuls on the CPU
    cpu_bandwidth: float  # bytes/s the CPU streams weights at (small batches are bandwidth bound)
    copy_bandwidth: float  # host -> device bytes/s from pinned memory
    device_flops: float

    def cpu_time(self, tokens: int, nbytes: int, flops_per_token: float) -> float:
        return max(nbytes / self.cpu_bandwidth, tokens * flops_per_token / self.cpu_flops)

    def promote_time(self, tokens: int, nbytes: int, flops_per_token: float) -> float:
        return nbytes / self.copy_bandwidth + tokens * flops_per_token / self.device_flops


def place(tokens: int, nbytes: int, flops_per_token: float, on_device: bool, has_room: bool,
          costs: DeviceCosts) -> Where:
    """Where one expert runs this step."""
    if on_device:
        return Where.DEVICE
    if has_room or costs.promote_time(tokens, nbytes, flops_per_token) < costs.cpu_time(tokens, nbytes,
                                                                                        flops_per_token):
        return Where.PROMOTE
    return Where.HOST
