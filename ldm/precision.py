"""Which precision to compute in, chosen for the hardware, the same way by every entry point.

`resolve("auto", accelerator)` picks bf16 autocast where the hardware computes in bfloat16 (GPUs
that support it; CPUs with AVX-512 BF16 or AMX) and float32 elsewhere. On a CPU without bf16
instructions (AVX2 only: most AMD Zen 2/3 machines, many laptops) PyTorch emulates bfloat16:
a matmul ran ~300x and a 3x3 convolution ~20x slower than in float32 on such a machine, so bf16
there is a trap, not a saving. train.py (the Lightning trainer), sample.py, the training
callbacks (through the trainer's precision plugin), the latent cache and the benchmarks all
resolve their precision here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
AUTO = "auto"
# Lightning's names; "-mixed" autocasts, "-true" casts the weights.
BF16 = ("bf16-mixed", "bf16-true", "bf16")
FP16 = ("16-mixed", "16-true", "16")
_warned: set[str] = set()


@dataclass(frozen=True)
class Precision:
    """A resolved precision (`value`, a Lightning precision string) and why it was chosen."""

    value: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the heavy maths runs in."""
        if self.value in BF16:
            return torch.bfloat16
        if self.value in FP16:
            return torch.float16
        return torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (PyTorch's oneDNN check: AVX-512 or AMX).

    oneDNN held to AVX2 or below (`ONEDNN_MAX_CPU_ISA=AVX2`, how a fast CPU imitates a slow one)
    counts as no: its bf16 kernels are then the emulated ones whatever the CPU has.
    """
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and not isa.startswith(("AVX512", "AVX10", "ALL", "DEFAULT")):
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def device_type(accelerator: str | torch.device | None) -> str:
    """'cuda' or 'cpu' for a Lightning accelerator name, a device or a device string."""
    name = str(accelerator or AUTO)
    if name == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith(("cuda", "gpu")) else "cpu"


def resolve(
    requested: str | int | None = AUTO, accelerator: str | torch.device | None = AUTO
) -> Precision:
    """The precision to run in on `accelerator`: `requested` itself, or the hardware's best for
    "auto"/None. An explicit bf16 on a CPU without bf16 instructions is kept, and warned about
    once."""
    device = device_type(accelerator)
    requested = AUTO if requested is None else str(requested)
    if requested != AUTO:
        if requested in BF16 and device == "cpu" and not cpu_has_bf16():
            _warn_once(
                f"precision {requested} on a CPU without bf16 instructions: PyTorch emulates "
                f"bfloat16 here, many times slower than float32; use precision=auto or 32-true"
            )
        return Precision(requested, "as configured")
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16-mixed", "auto: this GPU computes in bf16")
        return Precision(
            "32-true",
            "auto: this GPU has no bf16 (16-mixed, with loss scaling, is available on request)",
        )
    if cpu_has_bf16():
        return Precision("bf16-mixed", "auto: this CPU has bf16 instructions (AVX-512 BF16 / AMX)")
    return Precision(
        "32-true",
        "auto: this CPU has no bf16 instructions, where bf16 would be "
        "emulated and many times slower than float32",
    )


def autocast(precision: Precision, device: str | torch.device) -> contextlib.AbstractContextManager:
    """Autocast to `precision`'s dtype for inference outside Lightning (sampling, caching)."""
    if precision.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type(device), dtype=precision.dtype)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)
