"""Small models with the exact structure of SD 1.x / 2.x (widths shrunk, SD's GroupNorm 32 and
head rules kept), so that files written from them are detected like real SD checkpoints."""

from __future__ import annotations

import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.text_encoder import TextEncoder
from ldm.models.unet import UNetModel

UNET = {
    "sd1": dict(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        channel_mult=[1, 2, 2],
        num_res_blocks=1,
        attention_resolutions=[1, 2],
        num_heads=8,
        context_dim=64,
        norm_groups=32,
    ),
    "sd2": dict(
        in_channels=4,
        out_channels=4,
        model_channels=64,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[1],
        num_head_channels=64,
        context_dim=64,
        use_linear_in_transformer=True,
        norm_groups=32,
    ),
}
VAE = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, embed_dim=4, norm_groups=32)
TEXT = {  # SD 1: CLIP conventions, no projection; SD 2: open_clip, penultimate layer
    "sd1": dict(
        text_cfg=dict(width=64, heads=1, layers=2, context_length=16, proj_type="none"),
        layer="last",
        pad_with_eot=True,
        quick_gelu=True,
    ),
    "sd2": dict(
        text_cfg=dict(width=64, heads=1, layers=3, context_length=16),
        layer="penultimate",
        pad_with_eot=False,
        quick_gelu=False,
    ),
}


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Every parameter perturbed (zero-initialised ones and norms included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module


def sd_parts(family: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {
        "unet": randomize_(UNetModel(**UNET[family]), seed).eval(),
        "vae": randomize_(AutoencoderKL(**VAE), seed + 1).eval(),
        "text_encoder": randomize_(TextEncoder(**TEXT[family]), seed + 2).eval(),
    }


# SDXL's structure, small: no attention at the first level, per-level transformer depth, linear
# projections, 64-channel heads, two text towers (CLIP conventions, then open_clip's with a
# projection) read at their penultimate hidden states, the vector conditioning [pooled,
# six micro-conditioning numbers x 256] and the SDXL VAE's scale.
# the towers' widths differ, as ViT-L's and bigG's do (context 32 + 48 = 80, pooled 48): a mixed
# up tower order or width cannot pass unseen
SDXL_WIDTHS = (32, 48)
SDXL_CONTEXT, SDXL_POOLED = sum(SDXL_WIDTHS), SDXL_WIDTHS[1]
SDXL_UNET = dict(
    in_channels=4,
    out_channels=4,
    model_channels=64,
    channel_mult=[1, 2, 2],
    num_res_blocks=1,
    attention_resolutions=[2, 4],
    num_head_channels=64,
    context_dim=SDXL_CONTEXT,
    transformer_depth=[0, 1, 2],
    use_linear_in_transformer=True,
    adm_in_channels=SDXL_POOLED + 6 * 256,
    norm_groups=32,
)
SDXL_TOWER = dict(heads=1, layers=3, context_length=16)


def sdxl_towers() -> list[dict]:
    common = dict(layer="penultimate", final_norm=False)
    return [
        dict(
            text_cfg=dict(SDXL_TOWER, width=SDXL_WIDTHS[0], proj_type="none"),
            pad_with_eot=True,
            quick_gelu=True,
        ),
        dict(
            text_cfg=dict(SDXL_TOWER, width=SDXL_WIDTHS[1]),
            pad_with_eot=False,
            quick_gelu=False,
        ),
    ], common


def sdxl_parts(seed: int = 0) -> dict[str, torch.nn.Module]:
    from ldm.models.text_encoder import DualTextEncoder

    torch.manual_seed(seed)
    towers, common = sdxl_towers()
    text = DualTextEncoder([TextEncoder(**t, **common) for t in towers])
    return {
        "unet": randomize_(UNetModel(**SDXL_UNET), seed).eval(),
        "vae": randomize_(AutoencoderKL(**VAE, scale_factor=0.13025), seed + 1).eval(),
        "text_encoder": randomize_(text, seed + 2).eval(),
    }


def sdxl_diffusers_folder(folder, seed: int = 0):
    """A small SDXL pipeline folder made by diffusers itself (`StableDiffusionXLPipeline(...)
    .save_pretrained`): seeded random weights in its own classes and configs, written by hand
    here rather than by our exporter; the tokenizers' vocabulary is open_clip's."""
    import diffusers
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from ldm.checkpoints.diffusers import write_tokenizer

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        attention_head_dim=(1, 2, 2),  # head counts: 64 channels each
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=SDXL_CONTEXT,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=SDXL_POOLED + 6 * 256,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.13025,
    )

    def text(width: int, **kw) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=3,
            num_attention_heads=1,
            max_position_embeddings=16,
            bos_token_id=49406,
            eos_token_id=49407,
            **kw,
        )

    encoder = CLIPTextModel(text(SDXL_WIDTHS[0], hidden_act="quick_gelu", pad_token_id=49407))
    encoder_2 = CLIPTextModelWithProjection(
        text(SDXL_WIDTHS[1], hidden_act="gelu", pad_token_id=0, projection_dim=SDXL_POOLED)
    )
    for i, module in enumerate((unet, vae, encoder, encoder_2)):
        randomize_(module, seed + i, scale=0.02)
    towers, common = sdxl_towers()
    tokenizers = []
    for name, tower in zip(("tok", "tok_2"), towers):
        write_tokenizer(folder.parent / name, TextEncoder(**tower, **common))
        tokenizers.append(CLIPTokenizer.from_pretrained(folder.parent / name))
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = diffusers.StableDiffusionXLPipeline(
        vae, encoder, encoder_2, *tokenizers, unet, scheduler, force_zeros_for_empty_prompt=True
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe
