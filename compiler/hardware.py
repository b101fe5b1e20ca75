"""The GPU catalog: dense BF16 peak and memory per device, and a default MFU.

Peaks are the vendors' dense (no sparsity) BF16 tensor-core figures. Memory is what the device
reports, per device: nvidia-smi's "Total" in MiB (rocminfo's pool size for the MI300X), not the
marketed "80 GB", which is neither 80e9 bytes nor 80 GiB on every card. Default MFUs are the
realistic FSDP ranges for 1-3B dense models (A100 40-55%, H100/H200 35-45%; docs/DESIGN.md); a
spec's `hardware.mfu` overrides them.
"""

from __future__ import annotations

from dataclasses import dataclass


CPU_PSEUDO_DEVICE = "cpu"
# The least MFU a spec's hardware.mfu or a calibration run may give: below 1% a run is broken, and
# near zero predicted training times became infinite.
MIN_MFU = 0.01
MIB = 1 << 20


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense peak, TFLOP/s
    memory_gb: float  # per device as marketed (80 for an A100-80GB); a custom GPU's: 1e9 bytes
    default_mfu: float
    source: str
    memory_mib: int | None = None  # what the device reports (nvidia-smi "Total", MiB)

    @property
    def peak_flops(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def memory_bytes(self) -> float:
        """Capacity the planner fits into: the reported MiB, else memory_gb decimal gigabytes."""
        return self.memory_mib * MIB if self.memory_mib is not None else self.memory_gb * 1e9

    @property
    def is_cpu(self) -> bool:
        """The CPU pseudo-device: processes on host cores, fp32, no GPUs to request from SLURM."""
        return self.name == CPU_PSEUDO_DEVICE


CATALOG: dict[str, GPU] = {
    g.name.lower(): g
    for g in (
        # memory_mib: nvidia-smi's "Total" as printed by users of each card in public issues:
        # A100 40960 / 81920, H100 SXM 81559, L40S 46068 (modal-labs/modal-client#2797);
        # H100 PCIe 81559 (NVIDIA/TensorRT-LLM test report); H200 143771 (nvidia-smi output in
        # many public logs); B200 183359 (NVIDIA/TensorRT-LLM#10278); MI300X: rocminfo's
        # global pool of 201310208 KiB = 196592 MiB (ROCm/legacy-rocm-build#4414).
        GPU("A100-40GB", 312, 40, 0.45, "NVIDIA A100 datasheet: 312 TFLOP/s dense BF16; "
            "40960 MiB as nvidia-smi reports", 40960),
        GPU("A100-80GB", 312, 80, 0.45, "NVIDIA A100 datasheet: 312 TFLOP/s dense BF16; "
            "81920 MiB as nvidia-smi reports", 81920),
        GPU("H100-SXM", 989, 80, 0.40, "NVIDIA H100 datasheet: 989 TFLOP/s dense BF16 (SXM); "
            "81559 MiB as nvidia-smi reports", 81559),
        GPU("H100-PCIe", 756, 80, 0.40, "NVIDIA H100 datasheet: 756 TFLOP/s dense BF16 (PCIe); "
            "81559 MiB as nvidia-smi reports", 81559),
        GPU("H200", 989, 141, 0.40, "NVIDIA H200 datasheet: 989 TFLOP/s dense BF16, 141 GB; "
            "143771 MiB as nvidia-smi reports", 143771),
        GPU("B200", 2250, 180, 0.40, "NVIDIA B200 datasheet: 2.25 PFLOP/s dense BF16; "
            "183359 MiB as nvidia-smi reports", 183359),
        GPU("MI300X", 1307, 192, 0.35, "AMD MI300X datasheet: 1307 TFLOP/s dense BF16; "
            "196592 MiB as rocminfo reports", 196592),
        GPU("L40S", 362, 48, 0.40, "NVIDIA L40S datasheet: 362 TFLOP/s dense BF16 (no NVLink); "
            "46068 MiB as nvidia-smi reports", 46068),
        # A pseudo-device so tiny specs are runnable and testable on a laptop or CI machine.
        # 0.1 TFLOP/s is an assumption for a few fp32 cores; give a measured figure in the spec.
        GPU(CPU_PSEUDO_DEVICE, 0.1, 16, 0.30, "assumption: a few CPU cores in fp32, ~100 GFLOP/s"),
    )
}


@dataclass(frozen=True)
class Interconnect:
    """Per-GPU bandwidth, one direction, in GB/s (1e9 bytes/s), of the two tiers a collective can
    cross: to the other GPUs of the node, and the node's fabric (one NIC per GPU)."""

    intra_node_GBps: float
    inter_node_GBps: float
    source: str


# Link rates from the datasheets (bidirectional NVLink figures halved); the fabric is what
# clusters of each card typically have per GPU, an assumption a spec can override
# (hardware.interconnect).
_A100_LINKS = Interconnect(300, 25, "NVLink 3: 600 GB/s per GPU both ways (A100 datasheet); "
                          "fabric 200 Gb/s HDR InfiniBand per GPU (DGX A100; assumption)")
INTERCONNECT: dict[str, Interconnect] = {
    "a100-40gb": _A100_LINKS,
    "a100-80gb": _A100_LINKS,
    "h100-sxm": Interconnect(450, 50, "NVLink 4: 900 GB/s per GPU both ways (H100 datasheet); "
                             "fabric 400 Gb/s NDR InfiniBand per GPU (DGX H100; assumption)"),
    "h100-pcie": Interconnect(64, 50, "PCIe Gen5 x16: 128 GB/s both ways, no NVLink bridge "
                              "assumed; fabric 400 Gb/s per GPU (assumption)"),
    "h200": Interconnect(450, 50, "NVLink 4: 900 GB/s per GPU both ways (H200 datasheet); "
                         "fabric 400 Gb/s NDR InfiniBand per GPU (DGX H200; assumption)"),
    "b200": Interconnect(900, 50, "NVLink 5: 1.8 TB/s per GPU both ways (B200 datasheet); "
                         "fabric 400 Gb/s per GPU (DGX B200; assumption)"),
    "mi300x": Interconnect(448, 50, "Infinity Fabric: 7 links of 64 GB/s one way (MI300X "
                           "datasheet, 896 GB/s aggregate); fabric 400 Gb/s per GPU (assumption)"),
    "l40s": Interconnect(32, 12.5, "PCIe Gen4 x16: 64 GB/s both ways, no NVLink (L40S datasheet);"
                         " fabric 100 Gb/s per GPU (assumption)"),
    "cpu": Interconnect(5, 1.25, "assumption: gloo over shared memory inside a host, 10 GbE "
                        "between hosts"),
}
CUSTOM_INTERCONNECT = Interconnect(32, 12.5, "assumption for a custom GPU: PCIe Gen4 in the "
                                   "node, 100 Gb/s per GPU between nodes")

_A100_EFFICIENCY = (0.57, 0.68, "published: IBM fms-fsdp, Llama-2 7B on 128 A100-80GB with HSDP "
                    "(57% MFU eager, 68% with torch.compile; bench/published_throughput.json); "
                    "not measured with the generated train.py")
# The fraction of the dense peak a GPU's compute reaches in the generated train.py when nothing
# waits on the network: the MFU of a one-GPU run. (eager, torch.compile)
KERNEL_EFFICIENCY: dict[str, tuple[float, float, str]] = {
    "a100-80gb": _A100_EFFICIENCY,
    "a100-40gb": _A100_EFFICIENCY,  # the same compute as the 80 GB card
    "h100-sxm": (0.385, 0.475, "measured on one H200 with the generated train.py (bench/README.md, "
                 "2026-11-28: 36.9-40.4% eager, 47.2-47.9% compiled; same SXM compute as H100)"),
    "h200": (0.385, 0.475, "measured on one H200 with the generated train.py (bench/README.md, "
             "2026-11-28: 36.9-40.4% eager, 47.2-47.9% compiled)"),
}


def kernel_efficiency(gpu: GPU, compiled: bool) -> tuple[float, str]:
    """(fraction of peak, where it comes from): a measurement where there is one, else the
    catalog's default MFU as an assumption."""
    known = KERNEL_EFFICIENCY.get(gpu.name.lower())
    if known is not None:
        return known[1 if compiled else 0], known[2]
    return gpu.default_mfu, (f"assumption: the catalog's typical MFU for {gpu.name} "
                             "(not measured with the generated train.py)")


def interconnect(gpu: GPU) -> Interconnect:
    return INTERCONNECT.get(gpu.name.lower(), CUSTOM_INTERCONNECT)


def lookup(name: str) -> GPU | None:
    return CATALOG.get(name.lower())
