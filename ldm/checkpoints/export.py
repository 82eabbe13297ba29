"""Our models written for other tools: SD single files (+ the inference YAML of v models),
diffusers folders, and the weights file of a training run (`export_run`, what train.py writes).

The prediction type written is the model's own (`Loaded.prediction`, or the trained objective's
for a run), in each tool's name for it: `modelspec.prediction_type`, the LDM `parameterization`,
the diffusers scheduler's `prediction_type`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from ldm.checkpoints.detect import V_PRED_KEY, architecture_name
from ldm.checkpoints.diffusers import write_folder
from ldm.checkpoints.embeddings import save_embedding
from ldm.checkpoints.files import CONFIG_KEY, CheckpointError
from ldm.checkpoints.layout import save
from ldm.checkpoints.load import Loaded
from ldm.checkpoints.lora_networks import save_networks
from ldm.config import architecture
from ldm.diffusion.prediction import Prediction
from ldm.diffusion.schedule import SD_SCHEDULE
from ldm.fileio import atomic_folder, write_text
from ldm.models.autoencoder import SD_SCALE_FACTOR

log = logging.getLogger(__name__)


def sd_metadata(config: dict) -> dict:
    pred = Prediction.parse(config["diffusion"]["prediction"])
    return {
        CONFIG_KEY: config,
        "format": "sd",
        "modelspec.architecture": architecture_name(config),
        "modelspec.prediction_type": pred.modelspec_name,
    }


def inference_yaml(config: dict) -> dict:
    """The original LDM inference config of a model (what v2-inference-v.yaml says for SD 2)."""
    sched = {**SD_SCHEDULE, **config["diffusion"]["schedule"]}
    u = config["unet"]
    params = {
        "parameterization": Prediction.parse(config["diffusion"]["prediction"]).ldm_name,
        "linear_start": sched["beta_start"],
        "linear_end": sched["beta_end"],
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": sched["num_steps"],
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": config.get("image_size", 512) // 8,
        "channels": u["in_channels"],
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema",
        "scale_factor": config["vae"].get("scale_factor", SD_SCALE_FACTOR),
        "use_ema": False,
        "unet_config": ldm_unet_config(u),
        "first_stage_config": ldm_first_stage_config(config["vae"]),
        "cond_stage_config": ldm_cond_stage_config(config["text_encoder"]),
    }
    return {
        "model": {
            "base_learning_rate": 1.0e-4,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": params,
        }
    }


def ldm_unet_config(u: dict) -> dict:
    """The original code's UNetModel config of our U-Net config."""
    heads = (
        {"num_head_channels": u["num_head_channels"]}
        if u.get("num_head_channels", -1) != -1
        else {"num_heads": u["num_heads"]}
    )
    return {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {
            "use_checkpoint": True,
            "image_size": 32,
            "in_channels": u["in_channels"],
            "out_channels": u["out_channels"],
            "model_channels": u["model_channels"],
            "attention_resolutions": list(u["attention_resolutions"]),
            "num_res_blocks": u["num_res_blocks"],
            "channel_mult": list(u["channel_mult"]),
            **heads,
            "use_spatial_transformer": True,
            "use_linear_in_transformer": bool(u.get("use_linear_in_transformer")),
            "transformer_depth": u.get("transformer_depth", 1),
            "context_dim": u["context_dim"],
            "legacy": False,
        },
    }


def ldm_first_stage_config(v: dict) -> dict:
    """The original code's AutoencoderKL config of our VAE config."""
    return {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {
            "embed_dim": v.get("embed_dim", 4),
            "monitor": "val/rec_loss",
            "ddconfig": {
                "double_z": True,
                "z_channels": v.get("z_channels", 4),
                "resolution": 256,
                "in_channels": 3,
                "out_ch": 3,
                "ch": v.get("ch", 128),
                "ch_mult": list(v.get("ch_mult", [1, 2, 4, 4])),
                "num_res_blocks": v.get("num_res_blocks", 2),
                "attn_resolutions": [],
                "dropout": 0.0,
            },
            "lossconfig": {"target": "torch.nn.Identity"},
        },
    }


def ldm_cond_stage_config(t: dict) -> dict:
    """The original code's text encoder: OpenCLIP's (SD 2: penultimate layer, zero padding) or
    CLIP's (SD 1)."""
    if t.get("layer") == "penultimate" or not t.get("pad_with_eot"):
        return {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"freeze": True, "layer": t.get("layer", "last")},
        }
    return {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}


def save_sd(
    path: str | Path,
    model: Loaded,
    dtype: torch.dtype | None = None,
    write_yaml: bool | None = None,
) -> Path:
    """One SD single file (+ `NAME.yaml`, which tools need to tell an SD 1/2 v or x0 model from
    an eps one, unless `write_yaml` is False). An SDXL v model is marked by a `v_pred` key
    instead, where SDXL tools look (SDXL files have no LDM inference YAML of this form)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path.name}: SD single files are written as .safetensors")
    xl = "adm_in_channels" in model.config["unet"]
    if xl and write_yaml:
        raise CheckpointError("SDXL files are written without an inference YAML")
    v_marker = {V_PRED_KEY: torch.zeros(0)} if xl and model.prediction is Prediction.V else {}
    save(path, model.parts(), sd_metadata(model.config), dtype=dtype, markers=v_marker)
    if xl:
        return path
    if write_yaml or (write_yaml is None and model.prediction is not Prediction.EPS):
        write_text(
            path.with_suffix(".yaml"), yaml.safe_dump(inference_yaml(model.config), sort_keys=False)
        )
    return path


def save_diffusers(folder: str | Path, model: Loaded, dtype: torch.dtype | None = None) -> Path:
    """A diffusers pipeline folder (`from_pretrained` loads it offline), written aside and
    moved into place whole: a failure midway leaves the old folder (or none), never a mix."""
    parts = model.parts()
    if dtype is not None:
        parts = {k: v.to(dtype) for k, v in parts.items()}
    with atomic_folder(folder) as tmp:
        write_folder(tmp, parts, model.config)
    return Path(folder)


# ------------------------------------------------------------------------------- training runs


def diffusion_config(objective) -> dict:
    """What a loader needs of a trained objective: its schedule and prediction type."""
    return {
        "schedule": objective.schedule.config,
        "prediction": Prediction.parse(objective.prediction).value,
    }


def run_metadata(cfg: DictConfig, objective) -> dict:
    """What sample.py needs to rebuild a trained model from its weights file alone: the parts'
    architectures (from the run's config), the objective's schedule and prediction type (from
    the object that trained, not the config that may have been overridden), the image size."""

    def resolved(key: str):  # only these nodes: the rest may name Hydra's run-time values
        return OmegaConf.to_container(cfg[key], resolve=True)

    model = {k: architecture(resolved(k)) for k in ("unet", "vae", "text_encoder")}
    model["diffusion"] = diffusion_config(objective)
    model["image_size"] = cfg.data.image_size
    return {CONFIG_KEY: model, "format": "ldm", "experiment": cfg.logger.get("name") or ""}


def vae_metadata(cfg: DictConfig, module) -> dict:
    """A first stage's architecture, with the latent scale/shift measured on validation data."""
    meta = {"ldm.vae": architecture(OmegaConf.to_container(cfg.vae, resolve=True))}
    if module.latent_std is not None:
        scale, shift = module.latent_scale_and_shift()
        meta.update({"scale_factor": f"{scale:.6g}", "shift_factor": f"{shift:.6g}"})
    psnr = module.trainer.callback_metrics.get("val/psnr")
    if psnr is not None:
        meta["val_psnr_db"] = f"{float(psnr):.2f}"
    return meta


def run_writes(module) -> str:
    """What a run's weights file holds, as its choice of what trains says
    (ldm.training.trains: weights, lora, embedding); a first stage's run has no choice and
    writes its weights."""
    trains = getattr(module, "trains", None)
    return trains.writes if trains is not None else "weights"


def export_run(cfg: DictConfig, module, path: str | Path) -> Path:
    """A training module's weights as train.py writes them (`run_writes`): a textual inversion
    run's new word (A1111's format), a LoRA run's adapters (kohya layout, `ss_*` metadata), a
    diffusion model's EMA U-Net, VAE and text encoder (SD layout, `run_metadata`), or a first
    stage's VAE (`vae_metadata`)."""
    writes = run_writes(module)
    if writes == "embedding":
        word = module.trains.word
        path = save_embedding(
            path, module.text_encoder.embedding(word), word, {"ss_steps": str(module.global_step)}
        )
        log.info("embedding of %s written to %s", word, path)
        return path
    if writes == "lora":
        adapters = module.adapters()
        meta = {
            CONFIG_KEY: run_metadata(cfg, module.objective)[CONFIG_KEY],
            "ss_steps": str(module.global_step),
            "ss_output_name": Path(path).stem,
        }
        unet_cfg = architecture(OmegaConf.to_container(cfg.unet, resolve=True))
        path = save_networks(path, adapters, unet_cfg, module.objective.prediction, "kohya", meta)
        log.info(
            "LoRA written to %s (%d adapters)", path, sum(len(n.paths) for n in adapters.values())
        )
        return path
    parts = module.export_parts()
    meta = run_metadata(cfg, module.objective) if "unet" in parts else vae_metadata(cfg, module)
    dtype = getattr(torch, cfg.export_dtype) if cfg.get("export_dtype") else None
    path = save(path, parts, meta, dtype=dtype)
    log.info(
        "weights written to %s%s",
        path,
        "".join(
            f"\n  {k}: {v}"
            for k, v in meta.items()
            if k in ("scale_factor", "shift_factor", "val_psnr_db")
        ),
    )
    return path
