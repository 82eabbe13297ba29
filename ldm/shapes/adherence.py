"""The shapes set's prompt adherence during training, a Lightning callback (the one module of
ldm.shapes that imports Lightning): the EMA U-Net samples a fixed prompt set, the judge
(ldm.shapes.judge) reads the images back."""

from __future__ import annotations

import lightning as L
import torch

from ldm.diffusion.samplers import SamplerConfig
from ldm.shapes.judge import score
from ldm.shapes.render import random_prompts
from ldm.training.callbacks import sample_ema


class ShapesAdherence(L.Callback):
    """At each validation, sample a fixed prompt set with fixed seeds from the EMA U-Net and log
    the shapes judge's accuracies as val/adherence_{background,shape_colour,shape,all}.

    Only meaningful for models trained on the shapes set: the judge reads back shapes captions.
    """

    def __init__(
        self,
        n_prompts: int = 32,
        prompt_seed: int = 0,
        seed: int = 0,
        sampler: SamplerConfig | None = None,
        height: int = 64,
        width: int = 64,
    ) -> None:
        self.prompts = random_prompts(n_prompts, prompt_seed)
        self.seeds = [seed + i for i in range(n_prompts)]
        self.sampler = sampler or SamplerConfig(name="ddim", steps=20)
        self.height, self.width = height, width

    @torch.no_grad()
    def measure(self, trainer: L.Trainer, pl_module) -> dict[str, float]:
        images = sample_ema(
            trainer, pl_module, self.prompts, self.seeds, self.sampler, self.height, self.width
        )
        result = score(list(images.numpy()), self.prompts)
        return {k: float(v) for k, v in result.items() if k != "n"}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        for name, value in self.measure(trainer, pl_module).items():
            pl_module.log(f"val/adherence_{name}", value, rank_zero_only=True)
