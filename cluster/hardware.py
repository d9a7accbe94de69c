"""The hardware catalog: peak figures of the machines people pool.

Workers read it to fill a declared ``--hardware NAME``'s figures; the
scheduler's cost model reads it to predict times. Peak figures, not achieved
rates: the cost model's efficiencies turn one into the other. Every figure's
source is in ``docs/catalog.md``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    """One accelerator as the cost model sees it (peaks, not achieved rates)."""

    name: str
    tflops: float  # peak dense fp16/bf16 tensor TFLOPS, no sparsity
    mem_bw_gbps: float  # peak memory bandwidth, GB/s
    mem_gb: float  # memory the accelerator can address, GB

    def __post_init__(self) -> None:
        if min(self.tflops, self.mem_bw_gbps, self.mem_gb) <= 0:
            raise ValueError(f"hardware {self.name!r}: tflops, mem_bw_gbps and mem_gb must be > 0")


class UnknownHardwareError(LookupError):
    """A hardware name that is not in the catalog; the message lists the known ones."""


HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        # 1 PFLOP sparse FP4 / 2 (dense) / 4 (FP4 -> BF16, Blackwell's 4:2:1 ratio).
        Hardware("dgx-spark", tflops=125.0, mem_bw_gbps=273.0, mem_gb=128.0),
        # 40-core GPU: 5,120 FP32 ALUs x 2 FLOPs x ~1.68 GHz; FP16 runs at the FP32 rate.
        Hardware("mac-m4-max", tflops=17.2, mem_bw_gbps=546.0, mem_gb=128.0),
        # 80-core GPU: 10,240 ALUs x 2 FLOPs x 1.398 GHz.
        Hardware("mac-m3-ultra", tflops=28.6, mem_bw_gbps=819.0, mem_gb=512.0),
        # Radeon 8060S, 40 RDNA 3.5 CUs x 512 FP16 FLOPs/clk (WMMA) x 2.9 GHz.
        Hardware("ryzen-ai-max-395", tflops=59.4, mem_bw_gbps=256.0, mem_gb=128.0),
        Hardware("rtx-3090", tflops=71.0, mem_bw_gbps=936.0, mem_gb=24.0),
        Hardware("rtx-4090", tflops=165.2, mem_bw_gbps=1008.0, mem_gb=24.0),
        Hardware("h100", tflops=989.4, mem_bw_gbps=3350.0, mem_gb=80.0),  # SXM5
    )
}


def lookup(name: str) -> Hardware:
    """The catalog entry for ``name``; ``UnknownHardwareError`` listing the known names otherwise."""
    if name not in HARDWARE:
        raise UnknownHardwareError(f"unknown hardware {name!r}; known hardware: {', '.join(HARDWARE)}")
    return HARDWARE[name]
