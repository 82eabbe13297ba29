import pytest
import torch

from ldm.models.text_encoder import TextEncoder

TINY = dict(width=32, heads=2, layers=2, context_length=16)
PROMPTS = ["a red circle on a blue background", ""]


def test_output_shape_and_tokens():
    enc = TextEncoder(text_cfg=TINY)
    out = enc(PROMPTS)
    assert out.shape == (2, 16, 32)
    ids = enc.tokenize(PROMPTS)
    assert ids[1, 0] == enc.tokenizer.sot_token_id and ids[1, 1] == enc.tokenizer.eot_token_id
    assert (ids[1, 2:] == 0).all()  # open_clip pads with zeros


def test_last_layer_matches_open_clip_token_output():
    enc = TextEncoder(text_cfg=dict(TINY, output_tokens=True))
    ids = enc.tokenize(PROMPTS)
    _, tokens = enc.model(ids)  # open_clip's own forward: ln_final over every token
    torch.testing.assert_close(enc.encode_tokens(ids), tokens)


def test_penultimate_layer_skips_the_last_block():
    last = TextEncoder(text_cfg=TINY, layer="last")
    pen = TextEncoder(text_cfg=TINY, layer="penultimate")
    pen.load_state_dict(last.state_dict())
    ids = last.tokenize(PROMPTS)
    m = last.model
    x = m.token_embedding(ids) + m.positional_embedding
    x = m.transformer.resblocks[0](x, attn_mask=m.attn_mask)
    torch.testing.assert_close(pen.encode_tokens(ids), m.ln_final(x))
    assert not torch.allclose(pen.encode_tokens(ids), last.encode_tokens(ids))


def test_sd1_padding_repeats_the_end_token():
    enc = TextEncoder(text_cfg=TINY, pad_with_eot=True)
    ids = enc.tokenize(PROMPTS)
    eot = enc.tokenizer.eot_token_id
    assert (ids[1, 1:] == eot).all()
    assert ids[0, 9:].eq(eot).all() and ids[0, 8] == eot and ids[0, 7] != eot


def test_frozen_means_no_grad_and_eval_even_after_train():
    enc = TextEncoder(text_cfg=TINY, frozen=True)
    enc.train()
    assert not enc.training
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc(PROMPTS).requires_grad


def test_trainable_tower_with_frozen_token_table():
    enc = TextEncoder(text_cfg=TINY, frozen=False, train_token_embedding=False)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert "model.token_embedding.weight" not in trainable
    assert "model.transformer.resblocks.0.attn.in_proj_weight" in trainable
    enc(PROMPTS).sum().backward()
    assert all(p.grad is not None for n, p in enc.named_parameters() if n in trainable)


def test_open_clip_model_names_build_their_towers():
    with torch.device("meta"):  # full size, no memory
        enc = TextEncoder("ViT-H-14", layer="penultimate")
    assert enc.width == 1024 and len(enc.model.transformer.resblocks) == 24
    with pytest.raises(ValueError, match="open_clip knows no model"):
        TextEncoder("ViT-Q-99")


# --- parity with transformers' CLIPTextModel (SD 1) and open_clip's own forward (SD 2) ----


def _clip_pair(width: int, heads: int, layers: int, context: int, model_name: str | None = None):
    """Our SD 1 tower and a transformers CLIPTextModel with the same random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.checkpoints.keymaps import hf_clip_to_open_clip

    torch.manual_seed(0)
    reference = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=context,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    ).eval()
    with torch.no_grad():  # norms and biases away from their trivial init
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    text_cfg = (
        {"proj_type": "none"}
        if model_name
        else dict(width=width, heads=heads, layers=layers, context_length=context, proj_type="none")
    )
    ours = TextEncoder(model_name, text_cfg=text_cfg, quick_gelu=True, pad_with_eot=True)
    state = {"model." + k: v for k, v in hf_clip_to_open_clip(reference.state_dict()).items()}
    ours.load_state_dict(state, strict=True)
    return ours, reference


def _assert_clip_parity(ours, reference):
    ids = ours.tokenize(["a photograph of an astronaut riding a horse", "", "a red circle"])
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        actual = ours.encode_tokens(ids)
    err, scale = (actual - expected).abs().max(), expected.abs().max()
    print(f"max |ours - CLIPTextModel| = {err:.3g}, output scale {scale:.3g}")
    assert err <= 1e-4 * scale


def test_sd1_tower_matches_transformers_clip():
    _assert_clip_parity(*_clip_pair(width=64, heads=2, layers=2, context=16))


@pytest.mark.slow
def test_full_vit_l_matches_transformers_clip():
    _assert_clip_parity(
        *_clip_pair(width=768, heads=12, layers=12, context=77, model_name="ViT-L-14")
    )


def test_sd2_penultimate_matches_open_clip_intermediates():
    enc = TextEncoder(text_cfg=dict(TINY, layers=3), layer="penultimate")
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids = enc.tokenize(PROMPTS)
    with torch.no_grad():
        out = enc.model.forward_intermediates(
            ids,
            indices=[1],
            normalize_intermediates=True,
            intermediates_only=True,
            output_fmt="NLC",
        )
        torch.testing.assert_close(
            enc.encode_tokens(ids), out["text_intermediates"][0], rtol=0, atol=1e-6
        )


# --- SDXL: penultimate hidden states without the final norm, and the pooled vector ----------


def test_sdxl_tower_matches_transformers_clip_with_projection():
    """SDXL's second tower as diffusers runs it (CLIPTextModelWithProjection: hidden_states[-2]
    and text_embeds) against ours on the same random weights. text_projection is square here,
    as bigG's 1280 x 1280 is, so a transposed copy would load without error: only the numbers
    tell."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ldm.checkpoints.keymaps import hf_clip_to_open_clip

    width = 32
    torch.manual_seed(0)
    reference = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=16,
            hidden_act="gelu",
            projection_dim=width,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )
    ).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = TextEncoder(
        text_cfg=dict(TINY, layers=3), layer="penultimate", final_norm=False, quick_gelu=False
    )
    state = {"model." + k: v for k, v in hf_clip_to_open_clip(reference.state_dict()).items()}
    ours.load_state_dict(state, strict=True)
    ids = ours.tokenize(["a photograph of an astronaut riding a horse", "", "a red circle"])
    with torch.no_grad():
        out = reference(input_ids=ids, output_hidden_states=True)
        context, pooled = ours.encode_tokens(ids, pooled=True)
    torch.testing.assert_close(context, out.hidden_states[-2], rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, out.text_embeds, rtol=0, atol=1e-5)
    # The same file read with the projection the other way round loads (square) but is wrong.
    flipped = TextEncoder(
        text_cfg=dict(TINY, layers=3), layer="penultimate", final_norm=False, quick_gelu=False
    )
    flipped.load_state_dict({**state, "model.text_projection": state["model.text_projection"].t()})
    with torch.no_grad():
        _, wrong = flipped.encode_tokens(ids, pooled=True)
    assert (wrong - out.text_embeds).abs().max() > 1e-3
    assert torch.equal(ours.encode_tokens(ids), context)  # the context alone is the same


def _hf_tower(with_projection: bool, act: str, pad: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = cls(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=16,
            hidden_act=act,
            projection_dim=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=pad,
        )
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def test_dual_text_encoder_is_diffusers_sdxl_prompt_encoding():
    """StableDiffusionXLPipeline.encode_prompt: each tower's hidden_states[-2] concatenated,
    the pooled vector the second tower's text_embeds."""
    from ldm.checkpoints.keymaps import hf_clip_to_open_clip
    from ldm.models.text_encoder import DualTextEncoder

    torch.manual_seed(0)
    first, second = _hf_tower(False, "quick_gelu", 49407), _hf_tower(True, "gelu", 0)
    common = dict(layer="penultimate", final_norm=False)
    ours = DualTextEncoder(
        [
            TextEncoder(
                text_cfg=dict(TINY, layers=3, proj_type="none"),
                pad_with_eot=True,
                quick_gelu=True,
                **common,
            ),
            TextEncoder(text_cfg=dict(TINY, layers=3), quick_gelu=False, **common),
        ]
    )
    for i, ref in enumerate((first, second)):
        state = {"model." + k: v for k, v in hf_clip_to_open_clip(ref.state_dict()).items()}
        ours.embedders[i].load_state_dict(state, strict=True)
    prompts = ["a photograph of an astronaut riding a horse", ""]
    with torch.no_grad():
        context, pooled = ours.encode(prompts)
        outs = [
            ref(input_ids=e.tokenize(prompts), output_hidden_states=True)
            for e, ref in zip(ours.embedders, (first, second))
        ]
    expected = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
    assert context.shape == (2, 16, 64) and ours.width == 64
    torch.testing.assert_close(context, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, outs[1].text_embeds, rtol=0, atol=1e-5)


def test_sdxl_towers_full_size_equal_transformers_on_meta():
    """configs/text_encoder/sdxl.yaml at full size (meta device): each tower has the parameters
    and, renamed, the keys of diffusers' text_encoder (CLIPTextModel, ViT-L) and text_encoder_2
    (CLIPTextModelWithProjection, bigG)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm.checkpoints.keymaps import hf_clip_to_open_clip
    from ldm.config import ROOT

    cfg = OmegaConf.load(ROOT / "configs" / "text_encoder" / "sdxl.yaml")
    common = dict(vocab_size=49408, max_position_embeddings=77)
    vit_l = CLIPTextConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
        **common,
    )
    big_g = CLIPTextConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
        projection_dim=1280,
        **common,
    )
    with torch.device("meta"):
        ours = instantiate(cfg)
        references = [CLIPTextModel(vit_l), CLIPTextModelWithProjection(big_g)]
    assert ours.width == 2048 and ours.context_length == 77
    for tower, ref in zip(ours.embedders, references):
        assert sum(p.numel() for p in tower.parameters()) == sum(
            p.numel() for p in ref.parameters()
        )
        renamed = {"model." + k for k in hf_clip_to_open_clip(ref.state_dict())}
        assert renamed == set(tower.state_dict())
