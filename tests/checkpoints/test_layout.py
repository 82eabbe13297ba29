import pytest
import torch

from ldm.checkpoints import CheckpointError, files, layout
from tests.conftest import tiny_parts


def test_save_uses_sd_prefixes_and_round_trips_bit_exactly(tmp_path):
    unet, vae, text = tiny_parts()
    path = layout.save(
        tmp_path / "m.safetensors",
        {"unet": unet, "vae": vae, "text_encoder": text},
        {"ldm.config": {"a": 1}},
    )
    state, meta = files.read(path)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in state)
    assert any(k.startswith("first_stage_model.encoder.") for k in state)
    assert "cond_stage_model.model.token_embedding.weight" in state
    assert files.read_config(path) == {"a": 1}
    fresh_unet, fresh_vae, _ = tiny_parts()
    for name, module, fresh in (("unet", unet, fresh_unet), ("vae", vae, fresh_vae)):
        layout.load_into(fresh, layout.split(state, name))
        for (k, a), b in zip(module.state_dict().items(), fresh.state_dict().values()):
            assert torch.equal(a, b), k
    assert not list(tmp_path.glob("*.tmp"))


def test_mismatch_lists_missing_unexpected_and_shapes():
    unet, _, _ = tiny_parts()
    state = dict(unet.state_dict())
    state.pop("out.2.weight")
    state["extra.weight"] = torch.zeros(1)
    state["time_embed.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as e:
        layout.load_into(unet, state, "unet")
    msg = str(e.value)
    assert "1 missing [out.2.weight]" in msg and "1 unexpected [extra.weight]" in msg
    assert "time_embed.0.weight: file (3, 3)" in msg


def test_missing_and_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        files.read(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        files.read(bad)
    other = tmp_path / "weights.txt"
    other.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="expected .safetensors, .ckpt"):
        files.read(other)
    pickle = tmp_path / "weights.ckpt"
    pickle.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="weights_only"):
        files.read(pickle)


def test_sd1_style_tower_is_written_in_clip_names_and_split_back():
    from ldm.models.text_encoder import TextEncoder

    text = TextEncoder(
        text_cfg=dict(width=32, heads=2, layers=2, context_length=16, proj_type="none"),
        pad_with_eot=True,
        quick_gelu=True,
    )
    state = layout.sd_state({"text_encoder": text})
    assert (
        "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in state
    )
    assert state["cond_stage_model.transformer.text_model.embeddings.position_ids"].tolist() == [
        list(range(16))
    ]
    back = layout.split(state, "text_encoder")
    own = text.state_dict()
    assert back.keys() == own.keys() and all(torch.equal(back[k], own[k]) for k in own)
    # Old SD 1 files name the tower without `text_model.`; both read the same.
    legacy = {k.replace("transformer.text_model.", "transformer."): v for k, v in state.items()}
    assert all(torch.equal(layout.split(legacy, "text_encoder")[k], own[k]) for k in own)
