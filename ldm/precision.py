"""Which precision to compute in, chosen for the hardware, the same way by every entry point.

`resolve("auto", accelerator)` picks bf16 autocast where the hardware computes faster in bfloat16
than in float32 (GPUs that support it; CPUs with AMX tiles, Intel Xeon since Sapphire Rapids) and
float32 elsewhere. Three kinds of CPU:

- AVX2 only (most AMD Zen 2/3 machines, many laptops): PyTorch emulates bfloat16; a matmul ran
  ~300x and a 3x3 convolution ~20x slower than in float32, so bf16 there is a trap.
- AVX-512 BF16 without AMX (AMD Zen 4/5): bf16 is native but not faster. The shapes default's
  training step ran at 137 images/s in bf16 autocast against 154 in float32 on a 2-core Zen 4
  (`bench/step_time.py --precision ...`), so `auto` keeps float32 there.
- AMX: bf16 matmuls and convolutions run on the tile units (not measured side by side here).

train.py (the Lightning trainer), sample.py, the training callbacks (through the trainer's
precision plugin), the latent cache and the benchmarks all resolve their precision here.

Sampling (`resolve(..., sampling=True)`: sample.py, DreamBooth's class images) is the exception
on a CPU: "auto" samples in float32 there, as diffusers does, so one command gives one picture
on every kind of CPU (bf16 rounds differently from float32 by a few 8-bit steps); bf16 on
request (`precision=bf16`). A GPU with bf16 samples in bf16.

`LDM_CPU_BF16=1` (or `0`) makes "auto" choose as on an AMX CPU (or on any other), whatever this
one has: how CI runs the bf16 path on a CPU where `auto` is float32 (slowly where bf16 is
emulated), and the float32 path on an AMX machine. Holding oneDNN below AMX
(`ONEDNN_MAX_CPU_ISA=AVX2`, with `ATEN_CPU_CAPABILITY=avx2` for ATen's own kernels) counts as
no AMX, and below AVX-512 as no bf16 instructions at all.
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


def _cpu_switch() -> bool | None:
    """`LDM_CPU_BF16` as a bool, or None where it is not set."""
    forced = os.environ.get(CPU_BF16_SWITCH, "").strip()
    if not forced:
        return None
    if forced not in ("0", "1"):
        raise ValueError(
            f"{CPU_BF16_SWITCH}={forced!r}: use 1 (an AMX CPU), 0 (any other) or unset"
        )
    return forced == "1"


def _onednn_allows(*prefixes: str) -> bool:
    """Whether `ONEDNN_MAX_CPU_ISA` (how a fast CPU imitates a slow one) leaves these ISAs on."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return not isa or isa.startswith((*prefixes, "AVX10", "ALL", "DEFAULT"))


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (PyTorch's oneDNN check: AVX-512 BF16 or
    AMX); without, bf16 is emulated. `LDM_CPU_BF16=1` answers yes."""
    if _cpu_switch():
        return True
    return _onednn_allows("AVX512") and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_bf16_is_faster() -> bool:
    """Whether bf16 is this CPU's fast path, so `auto` trains in it: AMX tiles (module doc).
    `LDM_CPU_BF16` ("1" or "0"), where set, answers instead."""
    forced = _cpu_switch()
    if forced is not None:
        return forced
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)  # private in torch 2.x
    return _onednn_allows("AVX512_CORE_AMX") and bool(amx())


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
    if cpu_bf16_is_faster():
        return Precision("bf16-mixed", "auto: this CPU computes bf16 on AMX tiles")
    if cpu_has_bf16():
        return Precision(
            "32-true",
            "auto: this CPU has bf16 instructions but no AMX, where bf16 is no faster than "
            "float32 (precision=bf16-mixed on request)",
        )
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
