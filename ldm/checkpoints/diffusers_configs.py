"""Model configs translated between ours and diffusers / transformers `config.json` files.

Our configs are the constructor arguments of `UNetModel`, `AutoencoderKL`, `TextEncoder` and
`NoiseSchedule` (with `_target_`); theirs are what `UNet2DConditionModel`, `AutoencoderKL`,
`CLIPTextModel` and the schedulers' `scheduler_config.json` hold. Key names are renamed by
`keymaps`, configs here; neither touches a tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ldm.checkpoints.detect import OPEN_CLIP_NAMES
from ldm.diffusion.prediction import Prediction
from ldm.diffusion.schedule import SD_SCHEDULE, NoiseSchedule
from ldm.models.autoencoder import SD_SCALE_FACTOR

DIFFUSERS_VERSION = "0.30.0"  # the format written; later versions read it
MICRO_DIM = 256  # SDXL's width per micro-conditioning number (`unet.micro_conditioning`)

# ------------------------------------------------------------------------------- U-Net


def diffusers_unet_config(config: Mapping, micro_dim: int = MICRO_DIM) -> dict:
    """The diffusers `UNet2DConditionModel` arguments equivalent to a `UNetModel` config; a
    vector-conditioned one (SDXL's `adm_in_channels`) as diffusers' "text_time" embedding, its
    micro-conditioning embedded `micro_dim` wide per number (SDXL: 256)."""
    n_levels = len(config["channel_mult"])
    channels = [config["model_channels"] * m for m in config["channel_mult"]]
    has_attention = [2**lv in config["attention_resolutions"] for lv in range(n_levels)]
    # diffusers' `attention_head_dim` is, for historical reasons, the number of heads.
    if config.get("num_head_channels", -1) != -1:
        heads = [c // config["num_head_channels"] for c in channels]
    else:
        heads = config["num_heads"]
    depth = config.get("transformer_depth", 1)
    vector = config.get("adm_in_channels")
    return dict(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        block_out_channels=channels,
        layers_per_block=config["num_res_blocks"],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        up_block_types=[
            "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)
        ],
        cross_attention_dim=config["context_dim"],
        attention_head_dim=heads,
        transformer_layers_per_block=depth if isinstance(depth, int) else list(depth),
        use_linear_projection=config.get("use_linear_in_transformer", False),
        norm_num_groups=config.get("norm_groups", 32),
        **(
            dict(
                addition_embed_type="text_time",
                addition_time_embed_dim=micro_dim,
                projection_class_embeddings_input_dim=vector,
            )
            if vector is not None
            else {}
        ),
    )


_UNSUPPORTED_UNET = (
    "class_embed_type",
    "reverse_transformer_layers_per_block",
    "encoder_hid_dim",
    "num_class_embeds",
    "time_embedding_type",
    "mid_block_only_cross_attention",
    "only_cross_attention",
)


def unet_config_from_diffusers(cfg: Mapping) -> dict:
    """A `UNetModel` config from a diffusers `unet/config.json`."""
    bad = [k for k in _UNSUPPORTED_UNET if cfg.get(k) not in (None, False, "positional")]
    if cfg.get("addition_embed_type") not in (None, "text_time"):  # text_time: SDXL's
        bad.append("addition_embed_type")
    if bad:
        raise ValueError(
            f"diffusers U-Net features without an SD 1.x/2.x or SDXL equivalent: {bad}"
        )
    channels = list(cfg["block_out_channels"])
    base = channels[0]
    heads = cfg.get("attention_head_dim", 8)
    out = dict(
        _target_="ldm.models.unet.UNetModel",
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        model_channels=base,
        channel_mult=[c // base for c in channels],
        num_res_blocks=cfg.get("layers_per_block", 2),
        attention_resolutions=[
            2**i for i, t in enumerate(cfg["down_block_types"]) if "CrossAttn" in t
        ],
        context_dim=cfg.get("cross_attention_dim", 768),
        transformer_depth=cfg.get("transformer_layers_per_block", 1),
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
        norm_groups=cfg.get("norm_num_groups", 32),
    )
    if cfg.get("addition_embed_type") == "text_time":
        if cfg.get("addition_time_embed_dim", MICRO_DIM) != MICRO_DIM:
            raise ValueError(
                f"addition_time_embed_dim {cfg['addition_time_embed_dim']}: the "
                f"micro-conditioning is embedded {MICRO_DIM} wide per number (SDXL's)"
            )
        out["adm_in_channels"] = cfg["projection_class_embeddings_input_dim"]
    if isinstance(heads, int):
        out["num_heads"] = heads
    else:  # a head count per level of fixed width (SD 2.x: 64 channels per head)
        widths = {c // h for c, h in zip(channels, heads)}
        if len(widths) != 1:
            raise ValueError(f"attention_head_dim {heads} gives unequal head widths {widths}")
        out["num_head_channels"] = widths.pop()
    return out


# ------------------------------------------------------------------------------- VAE


def vae_config_from_diffusers(cfg: Mapping) -> dict:
    """An `AutoencoderKL` config from a diffusers `vae/config.json`."""
    channels = list(cfg["block_out_channels"])
    return dict(
        _target_="ldm.models.autoencoder.AutoencoderKL",
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        ch=channels[0],
        ch_mult=[c // channels[0] for c in channels],
        num_res_blocks=cfg.get("layers_per_block", 2),
        z_channels=cfg.get("latent_channels", 4),
        embed_dim=cfg.get("latent_channels", 4),
        norm_groups=cfg.get("norm_num_groups", 32),
        resolution=cfg.get("sample_size", 256),
        scale_factor=cfg.get("scaling_factor", SD_SCALE_FACTOR),
        shift_factor=cfg.get("shift_factor") or 0.0,
    )


def diffusers_vae_config(config: Mapping) -> dict:
    """The diffusers `AutoencoderKL` arguments equivalent to an `AutoencoderKL` config."""
    ch, mult = config.get("ch", 128), list(config.get("ch_mult", (1, 2, 4, 4)))
    if config.get("z_channels", 4) != config.get("embed_dim", 4) or config.get("attn_resolutions"):
        raise ValueError(
            "diffusers' AutoencoderKL needs z_channels == embed_dim and no per-level attention"
        )
    return dict(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        down_block_types=["DownEncoderBlock2D"] * len(mult),
        up_block_types=["UpDecoderBlock2D"] * len(mult),
        block_out_channels=[ch * m for m in mult],
        layers_per_block=config.get("num_res_blocks", 2),
        latent_channels=config.get("z_channels", 4),
        norm_num_groups=config.get("norm_groups", 32),
        sample_size=config.get("resolution", 256),
        scaling_factor=config.get("scale_factor", SD_SCALE_FACTOR),
        shift_factor=config.get("shift_factor") or None,
        force_upcast=not config.get("fp16_safe", True),  # what StableDiffusionXLPipeline reads
    )


# ------------------------------------------------------------------------------- text encoder


def text_config_from_hf(cfg: Mapping, sd2: bool) -> dict:
    """Our `TextEncoder` config for a transformers `CLIPTextModel` config (an SD 2 folder's
    tower stops one block before the penultimate layer's: that block is added back)."""
    width, layers = cfg["hidden_size"], cfg["num_hidden_layers"] + (1 if sd2 else 0)
    name = OPEN_CLIP_NAMES.get((width, layers))
    text_cfg = (
        {}
        if name
        else {
            "width": width,
            "heads": cfg["num_attention_heads"],
            "layers": layers,
            "context_length": cfg["max_position_embeddings"],
            "vocab_size": cfg["vocab_size"],
            "mlp_ratio": cfg["intermediate_size"] / width,
        }
    )
    if not sd2:
        text_cfg["proj_type"] = "none"
    return dict(
        _target_="ldm.models.text_encoder.TextEncoder",
        model_name=name,
        text_cfg=text_cfg or None,
        layer="penultimate" if sd2 else "last",
        frozen=True,
        pad_with_eot=not sd2,
        quick_gelu=cfg.get("hidden_act") == "quick_gelu",
    )


def sdxl_tower_config(cfg: Mapping, pad_with_eot: bool, projection: bool) -> dict:
    """Our `TextEncoder` config for one of an SDXL folder's towers (a transformers
    `CLIPTextModel` or, `projection`, `CLIPTextModelWithProjection` config): every block kept,
    read at the penultimate layer's hidden states without the final LayerNorm, as SDXL does."""
    width, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    name = OPEN_CLIP_NAMES.get((width, layers))
    text_cfg = {}
    if not name:
        if projection and cfg.get("projection_dim", width) != width:
            raise ValueError(
                f"projection_dim {cfg['projection_dim']} != hidden_size {width}: a custom tower's "
                f"projection is square here"
            )
        text_cfg = {
            "width": width,
            "heads": cfg["num_attention_heads"],
            "layers": layers,
            "context_length": cfg["max_position_embeddings"],
            "vocab_size": cfg["vocab_size"],
            "mlp_ratio": cfg["intermediate_size"] / width,
        }
    if not projection:
        text_cfg["proj_type"] = "none"
    return dict(
        _target_="ldm.models.text_encoder.TextEncoder",
        model_name=name,
        text_cfg=text_cfg or None,
        layer="penultimate",
        final_norm=False,
        frozen=True,
        pad_with_eot=pad_with_eot,
        quick_gelu=cfg.get("hidden_act") == "quick_gelu",
    )


def hf_text_config(encoder, layers: int) -> dict:
    """A transformers `CLIPTextModel` config for our `TextEncoder` cut to `layers` blocks."""
    m = encoder.model
    width = m.width
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": width,
        "intermediate_size": m.transformer.resblocks[0].mlp.c_fc.out_features,
        "num_attention_heads": m.heads,
        "num_hidden_layers": layers,
        "max_position_embeddings": m.context_length,
        "vocab_size": m.vocab_size,
        "hidden_act": "quick_gelu" if encoder.quick_gelu else "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": width,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407 if encoder.pad_with_eot else 0,
        "torch_dtype": "float32",
    }


def hf_projection_text_config(encoder) -> dict:
    """A transformers `CLIPTextModelWithProjection` config for a whole `TextEncoder` with a
    projection (SDXL's second tower)."""
    layers = len(encoder.model.transformer.resblocks)
    return {
        **hf_text_config(encoder, layers),
        "architectures": ["CLIPTextModelWithProjection"],
        "projection_dim": encoder.model.output_dim,
    }


# ------------------------------------------------------------------------------- scheduler


def diffusion_from_scheduler(sched: Mapping) -> dict:
    """Our `diffusion` config ({schedule, prediction}) from a `scheduler_config.json`.

    Explicit `trained_betas` are read only as the SNR-shifted schedule we write (with its
    `snr_shift`), checked against it; any other table is refused rather than replaced by the
    named schedule's, which would sample the model at noise levels it was not trained on."""
    schedule = dict(
        SD_SCHEDULE,
        kind=sched.get("beta_schedule", SD_SCHEDULE["kind"]),
        num_steps=sched.get("num_train_timesteps", SD_SCHEDULE["num_steps"]),
        beta_start=sched.get("beta_start", SD_SCHEDULE["beta_start"]),
        beta_end=sched.get("beta_end", SD_SCHEDULE["beta_end"]),
        zero_terminal_snr=bool(sched.get("rescale_betas_zero_snr", False)),
        snr_shift=float(sched.get("snr_shift", 1.0)),
    )
    if sched.get("trained_betas") is not None:
        _check_trained_betas(sched["trained_betas"], schedule)
    prediction = Prediction.parse(sched.get("prediction_type", "epsilon"))
    return {"schedule": schedule, "prediction": prediction.value}


def _betas(schedule: Mapping) -> torch.Tensor:
    """The betas of a schedule config (`NoiseSchedule`'s arguments, `_target_` aside)."""
    return NoiseSchedule(**{k: v for k, v in schedule.items() if k != "_target_"}).betas


def _check_trained_betas(betas, schedule: Mapping) -> None:
    ours = _betas(schedule)
    if len(betas) != len(ours) or max(abs(float(a) - float(b)) for a, b in zip(betas, ours)) > 1e-6:
        raise ValueError(
            "its trained_betas are not the schedule its other entries name (with snr_shift "
            f"{schedule['snr_shift']}); only SNR-shifted scaled_linear/linear/cosine "
            "schedules can be read"
        )


def scheduler_config(diffusion: Mapping) -> dict:
    """A diffusers `DDIMScheduler` config for our `diffusion` config ({schedule, prediction}).

    An SNR-shifted schedule has no diffusers name: its betas are written as `trained_betas`
    (which diffusers' schedulers use as they are; re-rescaling them to zero terminal SNR changes
    nothing), with `snr_shift` beside them for us to read back."""
    sched = {**SD_SCHEDULE, **diffusion["schedule"]}
    shifted = {}
    if float(sched["snr_shift"]) != 1.0:
        shifted = {
            "trained_betas": _betas(sched).tolist(),
            "snr_shift": float(sched["snr_shift"]),
        }
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_schedule": sched["kind"],
        "beta_start": sched["beta_start"],
        "beta_end": sched["beta_end"],
        "num_train_timesteps": sched["num_steps"],
        "prediction_type": Prediction.parse(diffusion["prediction"]).diffusers_name,
        "rescale_betas_zero_snr": bool(sched["zero_terminal_snr"]),
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "trailing" if sched["zero_terminal_snr"] else "leading",
        **shifted,
    }
