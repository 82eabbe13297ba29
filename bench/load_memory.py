"""Peak memory of loading a full-size SD 1.5 single file with `ldm.checkpoints.load_model`.

    python bench/load_memory.py sd15_fp16.safetensors   # writes the file if missing, then measures

The file holds random fp16 weights with SD 1.5's exact names and shapes (U-Net, VAE, CLIP
ViT-L/14 text encoder in SD 1's CLIP names: ~2.1 GB). Generation and measurement run in separate
processes, so the measured peak RSS is the loader's alone. Delete the file afterwards.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def write_file(path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ldm.checkpoints import files, layout

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "configs")):
        cfg = compose("train", overrides=["experiment=sd15_finetune", "init=x"])
    with torch.device("meta"):
        parts = {k: instantiate(cfg[k]) for k in ("unet", "vae", "text_encoder")}
    g = torch.Generator().manual_seed(0)
    state = {
        k: (
            torch.randn(v.shape, generator=g, dtype=torch.float32).half() * 0.02
            if v.is_floating_point()
            else torch.arange(v.shape[-1])[None]
        )
        for k, v in layout.sd_state(parts).items()
    }
    files.save_state(path, state)


def measure(path: Path) -> dict:
    from ldm.checkpoints import load_model

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (Linux: KiB)
    start = time.perf_counter()
    model = load_model(path)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # The file is memory-mapped: pages become resident when first read. Read every weight once
    # (as a forward pass would) so the figure below is the whole model resident.
    total = sum(
        float(t.float().sum()) for m in model.parts().values() for t in m.state_dict().values()
    )
    touched = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    nbytes = sum(
        t.numel() * t.element_size()
        for m in model.parts().values()
        for t in [*m.parameters(), *m.buffers()]
    )
    dtype = str(model.unet.input_blocks[0][0].weight.dtype)
    return {
        "file_gib": path.stat().st_size / 2**30,
        "model_gib": nbytes / 2**30,
        "dtype": dtype,
        "rss_before_gib": before,
        "rss_peak_gib": peak,
        "load_increase_gib": peak - before,
        "increase_over_model": (peak - before) / (nbytes / 2**30),
        "seconds": seconds,
        "rss_peak_all_weights_read_gib": touched,
        "all_read_increase_over_model": (touched - before) / (nbytes / 2**30),
        "checksum": total,
    }


if __name__ == "__main__":
    path = Path(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "--measure":
        print(json.dumps(measure(path)))
        sys.exit(0)
    if len(sys.argv) > 2 and sys.argv[2] == "--write":
        write_file(path)
        sys.exit(0)
    if not path.exists():  # in its own process: a child inherits its parent's peak RSS
        subprocess.run([sys.executable, __file__, str(path), "--write"], check=True)
    out = subprocess.run(
        [sys.executable, __file__, str(path), "--measure"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    print(json.dumps(json.loads(out.strip().splitlines()[-1]), indent=2))
