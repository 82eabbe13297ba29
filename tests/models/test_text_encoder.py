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
