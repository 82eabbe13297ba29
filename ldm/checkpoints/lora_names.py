"""Names of LoRA adapters: our module paths <-> the diffusers / transformers module paths that
LoRA files are written in, and those paths <-> kohya's flat names.

Every adapter has a canonical name: its component (`unet` or `text_encoder`) and the module path
diffusers' `UNet2DConditionModel` or transformers' `CLIPTextModel` give that layer, e.g.
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` or
`text_encoder.text_model.encoder.layers.3.self_attn.q_proj`. kohya's name is the same path with
its dots made underscores behind `lora_unet_` / `lora_te_`; underscores inside diffusers' own
words (`down_blocks`, `to_q`, `self_attn`, ...) are told apart by the table below, so a name can
be turned back without the model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ldm.checkpoints import keymaps

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
READ_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
# diffusers / transformers module names that hold an underscore themselves (longest first)
_WORDS = sorted(
    [
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "proj_in",
        "proj_out",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "time_emb_proj",
        "conv_shortcut",
        "conv_in",
        "conv_out",
        "text_model",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "final_layer_norm",
        "layer_norm1",
        "layer_norm2",
        "time_embedding",
        "linear_1",
        "linear_2",
        "conv_norm_out",
    ],
    key=len,
    reverse=True,
)
_TEXT_BLOCK = re.compile(r"^model\.transformer\.resblocks\.(\d+)\.(attn|mlp\.c_fc|mlp\.c_proj)$")
_TEXT_HF = {"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
ATTENTION_PARTS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}


def kohya_name(canonical: str) -> str:
    """`unet.down_blocks.0...to_q` -> `lora_unet_down_blocks_0_..._to_q`."""
    component, path = canonical.split(".", 1)
    return KOHYA_PREFIX[component] + path.replace(".", "_")


def canonical_name(kohya: str) -> str:
    """The inverse of `kohya_name`; ValueError for a name of no known component. Also read:
    `lora_te1_` (SDXL's first text encoder, and diffusers' PEFT -> kohya conversion) and text
    names without `text_model_` (transformers 5 module paths)."""
    for prefix, component in READ_PREFIXES.items():
        if kohya.startswith(prefix):
            path = _dotted(kohya[len(prefix) :])
            if component == "text_encoder" and not path.startswith("text_model."):
                path = "text_model." + path
            return f"{component}.{path}"
    raise ValueError(f"{kohya!r} is neither a lora_unet_* nor a lora_te_* name")


def _dotted(flat: str) -> str:
    out, rest = [], flat
    while rest:
        word = next((w for w in _WORDS if rest == w or rest.startswith(w + "_")), None)
        word = word or rest.split("_", 1)[0]
        out.append(word)
        rest = rest[len(word) + 1 :]
    return ".".join(out)


def unet_names(paths: list[str], unet_config: Mapping) -> dict[str, str]:
    """Our U-Net module paths (SD names) -> canonical names (diffusers paths behind `unet.`)."""
    fake = {f"{p}.weight": None for p in paths}
    renamed = keymaps.sd_unet_to_diffusers(fake, unet_config)  # keeps insertion order
    return {p: "unet." + k.removesuffix(".weight") for p, k in zip(paths, renamed)}


def text_names(paths: list[str]) -> dict[str, str]:
    """Our text-tower paths (open_clip names under `model.`) -> canonical names; an attention
    module stands for its four projections, named `<canonical>.{q,k,v,out}_proj` by callers."""
    out = {}
    for p in paths:
        m = _TEXT_BLOCK.match(p)
        if m is None:
            raise ValueError(
                f"no CLIPTextModel name for the text-encoder layer {p!r}: LoRA files "
                f"hold the attention and MLP layers of the transformer blocks only"
            )
        layer, module = m.groups()
        name = "self_attn" if module == "attn" else _TEXT_HF[module]
        out[p] = f"text_encoder.text_model.encoder.layers.{layer}.{name}"
    return out
