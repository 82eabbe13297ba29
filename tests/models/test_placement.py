"""Parts pinned to a device stay there when the training module moves (the meta device stands
for the accelerator), and what they return reaches the module's device."""

import pytest
import torch

from ldm.config import ConfigError
from ldm.diffusion.objective import DiffusionObjective
from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.placement import Pinnable
from ldm.training.module import LatentDiffusion
from ldm.training.options import EMASettings
from tests.conftest import tiny_parts


class Part(Pinnable):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)


def test_a_pinned_part_keeps_its_device_and_takes_dtype_changes():
    holder = torch.nn.Sequential(Part().pin("cpu"), torch.nn.Linear(2, 2))
    holder.to("meta")
    assert holder[0].linear.weight.device.type == "cpu" and holder[1].weight.is_meta
    holder.to(torch.float64)
    assert holder[0].linear.weight.dtype == torch.float64
    holder[0].pin(None)  # unpinned: it moves with its parent again
    holder.to("meta")
    assert holder[0].linear.weight.is_meta


def module(frozen: bool, **options) -> LatentDiffusion:
    unet, vae, text = tiny_parts()
    text.set_frozen(frozen)
    objective = DiffusionObjective(NoiseSchedule())
    return LatentDiffusion(unet, vae, text, objective, torch.optim.AdamW, **options)


def test_a_text_encoder_kept_on_the_cpu_conditions_the_unet_on_its_device():
    m = module(True, ema=EMASettings(0.9, device="cpu"), text_encoder_device="cpu")
    m.to("meta")
    assert all(p.is_meta for p in m.unet.parameters())
    assert all(p.device.type == "cpu" for p in m.text_encoder.parameters())
    cond = m.condition({"caption": ["a red circle"]}, keep=torch.ones(1, dtype=torch.bool))
    assert cond.is_meta  # encoded on the CPU, handed over on the U-Net's device
    ignored = set(m._ddp_params_and_buffers_to_ignore)
    assert {n for n in ignored if n.startswith("text_encoder.")} == {
        f"text_encoder.{k}" for k in m.text_encoder.state_dict()
    }
    assert any(n.startswith("ema.") for n in ignored)


def test_a_text_encoder_that_trains_is_not_kept_apart():
    with pytest.raises(ConfigError, match="text_encoder_device=null"):
        module(False, text_encoder_device="cpu")
