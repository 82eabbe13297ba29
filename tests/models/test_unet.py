"""Tests for the Stable Diffusion U-Net (`ldm.models.unet`).

Numerical parity is checked against diffusers' `UNet2DConditionModel`, whose
weights are renamed to the original Stable Diffusion layout by
`ldm.checkpoints.keymaps.diffusers_unet_to_sd` and loaded with strict=True.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch

from ldm.checkpoints.diffusers_configs import diffusers_unet_config as diffusers_config
from ldm.checkpoints.keymaps import diffusers_unet_to_sd, sd_unet_to_diffusers
from ldm.models import attention as attention_module
from ldm.models import unet as unet_module
from ldm.models.unet import UNetModel, timestep_embedding

SD15_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attention_resolutions=[4, 2, 1],
    num_heads=8,
    context_dim=768,
)
SD2_CONFIG = {
    **SD15_CONFIG,
    "num_heads": -1,
    "num_head_channels": 64,
    "context_dim": 1024,
    "use_linear_in_transformer": True,
}

TINY_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=[1, 2],
    num_res_blocks=1,
    attention_resolutions=[1],
    num_heads=2,
    context_dim=32,
    norm_groups=8,
)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("single_thread")


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (zero-initialised ones and norms included) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def random_inputs(config: Mapping, batch: int = 2, size: int = 16, seq: int = 7):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config["in_channels"], size, size, generator=gen)  # (B, C, H, W)
    t = torch.randint(0, 1000, (batch,), generator=gen)  # (B,)
    context = torch.randn(batch, seq, config["context_dim"], generator=gen)  # (B, L, D)
    return x, t, context


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 8)  # (3, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    args = t[:, None].float() * freqs
    torch.testing.assert_close(emb, torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
    assert timestep_embedding(t.float(), 7).shape == (3, 7)  # odd dims are zero padded


@pytest.mark.parametrize("size", [(16, 16), (8, 24)])
def test_output_shape(size):
    config = {**TINY_CONFIG, "out_channels": 8}
    model = UNetModel(**config)
    x = torch.randn(2, 4, *size)
    context = torch.randn(2, 5, 32)
    out = model(x, torch.tensor([3, 500]), context)
    assert out.shape == (2, 8, *size)
    # Scalar and float timesteps are accepted too.
    assert model(x, torch.tensor(10.5), context).shape == (2, 8, *size)


def test_zero_initialised_output():
    """SD zero-initialises the output conv, so a fresh model predicts zeros."""
    model = UNetModel(**TINY_CONFIG)
    x, t, context = random_inputs(TINY_CONFIG)
    assert torch.count_nonzero(model(x, t, context)) == 0
    for name in [
        "out.2.weight",
        "input_blocks.1.0.out_layers.3.weight",
        "input_blocks.1.1.proj_out.weight",
    ]:
        assert torch.count_nonzero(model.state_dict()[name]) == 0


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # SD 1.x style: conv projections, fixed head count
        dict(num_heads=-1, num_head_channels=16, use_linear_in_transformer=True),  # SD 2.x style
        dict(
            channel_mult=[1, 2, 2],
            num_res_blocks=2,
            attention_resolutions=[2, 1],
            transformer_depth=2,
        ),
        dict(attention_resolutions=[2], out_channels=6),
    ],
    ids=["sd1", "sd2", "three_levels", "attention_low_res"],
)
def test_matches_diffusers(overrides):
    from diffusers import UNet2DConditionModel

    config = {**TINY_CONFIG, **overrides}
    torch.manual_seed(0)
    reference = randomize_(UNet2DConditionModel(**diffusers_config(config))).eval()
    model = UNetModel(**config).eval()
    model.load_state_dict(diffusers_unet_to_sd(reference.state_dict(), config), strict=True)

    x, t, context = random_inputs(config)
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context).sample
        actual = model(x, t, context)
        actual_float_t = model(x, t.float(), context)
    assert expected.abs().max() > 0.1  # a non-trivial output
    assert (actual - expected).abs().max() <= 1e-5
    torch.testing.assert_close(actual_float_t, actual, rtol=0, atol=0)


def test_gradient_checkpointing_matches():
    config = {**TINY_CONFIG, "dropout": 0.1}
    plain = randomize_(UNetModel(**config)).train()
    ckpt = UNetModel(**config, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, context = random_inputs(config)

    calls = []

    def counting(fn):
        def wrapper(*args, **kwargs):
            calls.append(fn)
            assert kwargs.get("use_reentrant") is False
            return torch.utils.checkpoint.checkpoint(*args, **kwargs)

        return wrapper

    outputs, grads = [], []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(unet_module, "checkpoint", counting(unet_module.checkpoint))
        mp.setattr(attention_module, "checkpoint", counting(attention_module.checkpoint))
        for model in (plain, ckpt):
            torch.manual_seed(123)  # same dropout masks in both runs
            out = model(x, t, context)
            out.square().mean().backward()
            outputs.append(out.detach())
            grads.append({n: p.grad for n, p in model.named_parameters()})
        # 8 ResBlocks + 4 transformer blocks in this config, none from `plain`.
        assert len(calls) == 12
        # No checkpointing (and no warning about it) at inference.
        calls.clear()
        with torch.no_grad():
            ckpt.eval()(x, t, context)
        assert not calls

    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    for name, grad in grads[0].items():
        assert grad is not None, name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_autocast_keeps_dtype_and_groupnorm_in_float32():
    model = randomize_(UNetModel(**TINY_CONFIG))
    x, t, context = random_inputs(TINY_CONFIG, batch=1, size=8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, context)
        norm = model.input_blocks[1][0].in_layers[0]
        h = torch.randn(1, 32, 4, 4, dtype=torch.bfloat16)
        assert norm(h).dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    # A model cast entirely to bf16 works without autocast.
    assert model.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "config, expected",
    [(SD15_CONFIG, 859_520_964), (SD2_CONFIG, 865_910_724)],
    ids=["sd15", "sd2"],
)
def test_sd_parameter_counts(config, expected):
    with torch.device("meta"):
        model = UNetModel(**config)
    assert count_params(model) == expected


def test_sd15_state_dict_names():
    with torch.device("meta"):
        sd = UNetModel(**SD15_CONFIG).state_dict()
    assert len(sd) == 686
    expected_shapes = {
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.weight": (1280, 1280),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (320,),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.0.out_layers.0.bias": (320,),
        "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
        "input_blocks.1.1.norm.weight": (320,),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight": (320, 768),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias": (320,),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "input_blocks.1.1.transformer_blocks.0.norm3.weight": (320,),
        "input_blocks.1.1.proj_out.weight": (320, 320, 1, 1),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.11.0.in_layers.2.weight": (1280, 1280, 3, 3),
        "middle_block.0.emb_layers.1.weight": (1280, 1280),
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    for name, shape in expected_shapes.items():
        assert tuple(sd[name].shape) == shape, name
    assert "input_blocks.7.1.norm.weight" in sd  # level 2 (ds=4) has attention
    assert not any(
        k.startswith(("input_blocks.10.1", "output_blocks.0.1.")) for k in sd
    )  # ds=8 has none
    assert "input_blocks.1.0.skip_connection.weight" not in sd  # identity skip


def test_sd2_state_dict_names_and_heads():
    with torch.device("meta"):
        model = UNetModel(**SD2_CONFIG)
    sd = model.state_dict()
    assert tuple(sd["input_blocks.1.1.proj_in.weight"].shape) == (320, 320)
    assert tuple(sd["output_blocks.11.1.proj_out.weight"].shape) == (320, 320)
    assert tuple(sd["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape) == (320, 1024)
    # Fixed head width 64: 5 heads at 320 channels, 20 at 1280.
    assert model.input_blocks[1][1].transformer_blocks[0].attn1.heads == 5
    assert model.middle_block[1].transformer_blocks[0].attn2.heads == 20
    with torch.device("meta"):
        sd15 = UNetModel(**SD15_CONFIG)
    assert sd15.middle_block[1].transformer_blocks[0].attn2.heads == 8


def test_diffusers_mapping_covers_sd15():
    """The key mapping turns a full-size diffusers SD 1.5 U-Net into our exact key set."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        reference = UNet2DConditionModel(**diffusers_config(SD15_CONFIG))
        ours = UNetModel(**SD15_CONFIG)
    converted = diffusers_unet_to_sd(reference.state_dict(), SD15_CONFIG)
    ours_sd = ours.state_dict()
    assert converted.keys() == ours_sd.keys()
    assert all(converted[k].shape == v.shape for k, v in ours_sd.items())


def test_sd15_forward_flops_match_diffusers():
    """Forward FLOPs of SD 1.5 at 64x64 latents, 77 context tokens (about 803 GFLOP)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        ours = UNetModel(**SD15_CONFIG)
        reference = UNet2DConditionModel(**diffusers_config(SD15_CONFIG))
        x, t, context = torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.randn(1, 77, 768)
    flops = []
    for run in (
        lambda: ours(x, t, context),
        lambda: reference(x, t, encoder_hidden_states=context),
    ):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            run()
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1]
    assert flops[0] == pytest.approx(803e9, rel=5e-3)


@pytest.mark.parametrize(
    "config", [TINY_CONFIG, SD15_CONFIG, SD2_CONFIG], ids=["tiny", "sd15", "sd2"]
)
def test_key_maps_invert_each_other(config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        reference = UNet2DConditionModel(**diffusers_config(config)).state_dict()
    sd = diffusers_unet_to_sd(reference, config)
    back = sd_unet_to_diffusers(sd, config)
    assert back.keys() == reference.keys()
    assert all(back[k] is reference[k] for k in back)  # renamed, never copied


@pytest.mark.slow
@pytest.mark.parametrize("config", [SD15_CONFIG, SD2_CONFIG], ids=["sd15", "sd21"])
def test_full_size_matches_diffusers(config):
    """Full SD 1.5 / 2.1 U-Nets, fp32 on the CPU, identical random weights, 32x32 latents."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    reference = randomize_(UNet2DConditionModel(**diffusers_config(config)), seed=3).eval()
    model = UNetModel(**config).eval()
    model.load_state_dict(diffusers_unet_to_sd(reference.state_dict(), config), strict=True)
    x, t, context = random_inputs(config, batch=1, size=32, seq=77)
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=context).sample
        actual = model(x, t, context)
    scale = expected.abs().max()
    err = (actual - expected).abs().max()
    print(
        f"max |ours - diffusers| = {err:.3g}, output scale {scale:.3g}, relative {err / scale:.3g}"
    )
    assert scale > 0.1 and err <= 1e-4 * scale


# --------------------------------------------------------------------------
# SDXL: per-level transformer depth, vector conditioning (label_emb)
# --------------------------------------------------------------------------

SDXL_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    model_channels=320,
    channel_mult=[1, 2, 4],
    num_res_blocks=2,
    attention_resolutions=[2, 4],
    num_head_channels=64,
    context_dim=2048,
    transformer_depth=[0, 2, 10],
    use_linear_in_transformer=True,
    adm_in_channels=2816,  # pooled 1280 + 6 x 256
)
TINY_SDXL = dict(
    TINY_CONFIG,
    channel_mult=[1, 2, 2],
    attention_resolutions=[2, 4],
    num_heads=-1,
    num_head_channels=8,
    transformer_depth=[0, 1, 2],
    use_linear_in_transformer=True,
    adm_in_channels=16 + 6 * 8,  # pooled 16 + six numbers embedded 8 wide
)


def sdxl_inputs(batch: int = 2):
    gen = torch.Generator().manual_seed(2)
    pooled = torch.randn(batch, 16, generator=gen)
    time_ids = torch.tensor(
        [[16.0, 24.0, 0.0, 4.0, 16.0, 16.0], [32.0, 32.0, 2.0, 0.0, 16.0, 16.0]]
    )
    return pooled, time_ids[:batch]


def test_sdxl_structured_unet_matches_diffusers():
    """diffusers' "text_time" U-Net (SDXL) against ours: y = [pooled, micro_conditioning]."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    reference = UNet2DConditionModel(**diffusers_config(TINY_SDXL, micro_dim=8))
    reference = randomize_(reference).eval()
    model = UNetModel(**TINY_SDXL).eval()
    model.load_state_dict(diffusers_unet_to_sd(reference.state_dict(), TINY_SDXL), strict=True)
    x, t, context = random_inputs(TINY_SDXL)
    pooled, time_ids = sdxl_inputs()
    y = torch.cat([pooled, unet_module.micro_conditioning(time_ids, 8)], dim=1)
    with torch.no_grad():
        expected = reference(
            x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        actual = model(x, t, context, y=y)
        other_crop = model(x, t, context, y=y.roll(1, dims=0))
    assert expected.abs().max() > 0.1
    assert (actual - expected).abs().max() <= 1e-5
    assert (other_crop - actual).abs().max() > 1e-3  # the conditioning reaches the output


def test_the_vector_conditioning_is_required_exactly_where_the_model_has_one():
    x, t, context = random_inputs(TINY_SDXL)
    with pytest.raises(ValueError, match="takes a vector conditioning"):
        UNetModel(**TINY_SDXL)(x, t, context)
    with pytest.raises(ValueError, match="no vector conditioning"):
        UNetModel(**TINY_CONFIG)(x, t, context[..., :32], y=torch.zeros(2, 64))
    with pytest.raises(ValueError, match="3 levels"):
        UNetModel(**{**TINY_SDXL, "transformer_depth": [1, 2]})


def test_sdxl_parameter_count_and_names_equal_diffusers():
    """The full SDXL base U-Net on the meta device: 2,567,463,684 parameters (diffusers'
    stabilityai/stable-diffusion-xl-base-1.0 unet), every key mapped both ways."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNetModel(**SDXL_CONFIG)
        reference = UNet2DConditionModel(**diffusers_config(SDXL_CONFIG))
    assert count_params(model) == count_params(reference) == 2_567_463_684
    sd = diffusers_unet_to_sd(reference.state_dict(), SDXL_CONFIG)
    assert sd.keys() == model.state_dict().keys()
    assert (
        "label_emb.0.0.weight" in sd
        and "input_blocks.8.1.transformer_blocks.9.attn1.to_q.weight" in sd
    )
    assert sd_unet_to_diffusers(sd, SDXL_CONFIG).keys() == reference.state_dict().keys()


def test_an_sdxl_diffusers_config_reads_back():
    from ldm.checkpoints.diffusers_configs import unet_config_from_diffusers

    back = unet_config_from_diffusers(diffusers_config(SDXL_CONFIG))
    assert {k: v for k, v in back.items() if k != "_target_"} == {**SDXL_CONFIG, "norm_groups": 32}
