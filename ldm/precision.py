"""Which precision to compute in, chosen for the hardware, the same way by every entry point.

`resolve("auto", accelerator)` picks bf16 autocast where the hardware computes in bfloat16 (GPUs
that support it; CPUs with AVX-512 BF16 or AMX) and float32 elsewhere. On a CPU without bf16
instructions (AVX2 only: most AMD Zen 2/3 machines, many laptops) PyTorch emulates bfloat16:
a matmul ran ~300x and a 3x3 convolution ~20x slower than in float32 on such a machine, so bf16
there is a trap, not a saving. train.py (the Lightning trainer), sample.py, the training
callbacks (through the trainer's precision plugin), the latent cache and the benchmarks all
resolve their precision here.

Sampling (`resolve(..., sampling=True)`: sample.py, DreamBooth's class images) is the exception
on a CPU: "auto" samples in float32 there, as diffusers does, so one command gives one picture
on every kind of CPU (bf16 rounds differently from float32 by a few 8-bit steps); bf16 on
request (`precision=bf16`). A GPU with bf16 samples in bf16.

`LDM_CPU_BF16=1` (or `0`) makes "auto" choose as on a CPU with (or without) bf16 instructions,
whatever this one has: how CI runs the bf16 kind's code paths on an AVX2 machine (slowly, bf16
being emulated there), and the AVX2 kind's on a bf16 machine. Holding oneDNN to AVX2
(`ONEDNN_MAX_CPU_ISA=AVX2`, with `ATEN_CPU_CAPABILITY=avx2` for ATen's own kernels) also
counts as no bf16.
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
BF16 = ("bf16-mixed", "bf16-true")
FP16 = ("16-mixed", "16-true")
ALIASES = {"bf16": "bf16-mixed", "16": "16-mixed", "32": "32-true", "64": "64-true"}  # Lightning's
CPU_BF16_SWITCH = "LDM_CPU_BF16"  # "1"/"0": choose as on a CPU with/without bf16 (see above)
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
    counts as no: its bf16 kernels are then the emulated ones whatever the CPU has. `LDM_CPU_BF16`
    ("1" or "0"), where set, answers instead.
    """
    forced = os.environ.get(CPU_BF16_SWITCH, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(
                f"{CPU_BF16_SWITCH}={forced!r}: use 1 (bf16 CPU), 0 (AVX2 CPU) or unset"
            )
        return forced == "1"
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
    requested: str | int | None = AUTO,
    accelerator: str | torch.device | None = AUTO,
    *,
    sampling: bool = False,
) -> Precision:
    """The precision to run in on `accelerator`: `requested` itself, or the hardware's best for
    "auto"/None (for `sampling` on a CPU: float32, see the module doc). An explicit bf16 on a
    CPU without bf16 instructions is kept, and warned about once."""
    device = device_type(accelerator)
    requested = AUTO if requested is None else str(requested)
    requested = ALIASES.get(requested, requested)
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
    if sampling:
        return Precision(
            "32-true",
            "auto: sampling on a CPU runs in float32, the same picture on every kind of CPU "
            "(precision=bf16 on request)",
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
