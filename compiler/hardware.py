"""The GPU catalog: dense BF16 peak and memory per device, and a default MFU.

Peaks are the vendors' dense (no sparsity) BF16 tensor-core figures; memory is per device.
Default MFUs are the realistic FSDP ranges for 1-3B dense models from DESIGN.md (A100 40-55%,
H100/H200 35-45%); a spec's `hardware.mfu` overrides them.
"""

from __future__ import annotations

from dataclasses import dataclass


CPU_PSEUDO_DEVICE = "cpu"


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense peak, TFLOP/s
    memory_gb: float  # per device, GB (1e9 bytes)
    default_mfu: float
    source: str

    @property
    def peak_flops(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @property
    def is_cpu(self) -> bool:
        """The CPU pseudo-device: processes on host cores, fp32, no GPUs to request from SLURM."""
        return self.name == CPU_PSEUDO_DEVICE


CATALOG: dict[str, GPU] = {
    g.name.lower(): g
    for g in (
        GPU("A100-40GB", 312, 40, 0.45, "NVIDIA A100 datasheet: 312 TFLOP/s dense BF16"),
        GPU("A100-80GB", 312, 80, 0.45, "NVIDIA A100 datasheet: 312 TFLOP/s dense BF16"),
        GPU("H100-SXM", 989, 80, 0.40, "NVIDIA H100 datasheet: 989 TFLOP/s dense BF16 (SXM)"),
        GPU("H100-PCIe", 756, 80, 0.40, "NVIDIA H100 datasheet: 756 TFLOP/s dense BF16 (PCIe)"),
        GPU("H200", 989, 141, 0.40, "NVIDIA H200 datasheet: 989 TFLOP/s dense BF16, 141 GB"),
        GPU("B200", 2250, 180, 0.40, "NVIDIA B200 datasheet: 2.25 PFLOP/s dense BF16"),
        GPU("MI300X", 1307, 192, 0.35, "AMD MI300X datasheet: 1307 TFLOP/s dense BF16"),
        GPU("L40S", 362, 48, 0.40, "NVIDIA L40S datasheet: 362 TFLOP/s dense BF16 (no NVLink)"),
        # A pseudo-device so tiny specs are runnable and testable on a laptop or CI machine.
        # 0.1 TFLOP/s is an assumption for a few fp32 cores; give a measured figure in the spec.
        GPU(CPU_PSEUDO_DEVICE, 0.1, 16, 0.30, "assumption: a few CPU cores in fp32, ~100 GFLOP/s"),
    )
}


def lookup(name: str) -> GPU | None:
    return CATALOG.get(name.lower())
