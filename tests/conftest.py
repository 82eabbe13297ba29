"""Tiny parts shared by the tests: every model at its smallest, built from the library's classes."""
import functools

import pytest
import torch

from ldm.diffusion.objective import DiffusionObjective
from ldm.diffusion.schedule import NoiseSchedule
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text_encoder import TextEncoder
from ldm.models.unet import UNetModel
from ldm.module import LatentDiffusion


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models on one thread: on a shared few-core machine, intra-op parallelism only adds
    synchronisation overhead (and stalls badly under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_parts():
    torch.manual_seed(0)
    text = TextEncoder(text_cfg=dict(width=32, heads=2, layers=1, context_length=16),
                       frozen=False, train_token_embedding=False)
    unet = UNetModel(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2],
                     num_res_blocks=1, attention_resolutions=[2], num_head_channels=16,
                     context_dim=32, use_linear_in_transformer=True, norm_groups=8)
    vae = AutoencoderKL(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4,
                        resolution=64, norm_groups=4)
    return unet, vae, text


@pytest.fixture
def tiny_module():
    unet, vae, text = tiny_parts()
    objective = DiffusionObjective(NoiseSchedule(zero_terminal_snr=True), prediction="v")
    return LatentDiffusion(unet, vae, text, objective,
                           optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
                           warmup_steps=2, caption_dropout=0.1, ema_decay=0.9)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(4, 3, 64, 64, generator=g) * 2 - 1,
            "caption": ["a red circle on a blue background"] * 4}
