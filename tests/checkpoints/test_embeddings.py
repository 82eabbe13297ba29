"""Textual-inversion words: our tokenizer and text encoder with new words against diffusers'
`load_textual_inversion` on the same exported model, and A1111's file format."""

import os
import pickle
import re

import pytest
import torch

from ldm.checkpoints import CheckpointError, files, layout, load_model
from ldm.checkpoints.embeddings import check_words, read_embedding, save_embedding
from ldm.checkpoints.export import save_diffusers
from sd_fixtures import sd_parts

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, single_thread):
    root = tmp_path_factory.mktemp("ti")
    model = load_model(layout.save(root / "m.safetensors", sd_parts("sd1")))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        save_diffusers(root / "pipe", model),
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    return model, pipe


def test_a_new_word_gives_the_text_diffusers_gives_it(sd1, tmp_path):
    model, pipe = sd1
    text = model.text_encoder
    vectors = torch.randn(2, text.width, generator=torch.Generator().manual_seed(0))
    path = save_embedding(tmp_path / "pastel.safetensors", vectors, "<pastel>")
    back, token = read_embedding(path)
    assert token == "<pastel>" and torch.equal(back, vectors)
    plain = "a red circle on a blue background"
    before = text([plain])
    text.add_embedding(token, back)
    assert torch.equal(text([plain]), before)  # prompts without the word are untouched
    prompt = "a <pastel> circle on a blue background"
    ours = text([prompt])
    pipe.load_textual_inversion(str(path), token="<pastel>")
    try:
        converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)  # <pastel> <pastel>_1
        ids = pipe.tokenizer(
            converted, padding="max_length", max_length=text.context_length, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            theirs = pipe.text_encoder(ids).last_hidden_state
        assert torch.equal(ids, text.tokenize([prompt]))  # the new words get the same ids
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    finally:
        pipe.unload_textual_inversion()


def test_words_of_the_vocabulary_are_refused(sd1):
    model, _ = sd1
    with pytest.raises(ValueError, match="already a word of the vocabulary"):
        model.text_encoder.add_embedding("red", torch.zeros(1, model.text_encoder.width))
    with pytest.raises(ValueError, match="needs \\(n, 64\\)"):
        model.text_encoder.add_embedding("<x-style>", torch.zeros(1, 3))


# --------------------------------------------------------------------------------------------
# untrusted files: one CheckpointError naming the file, nothing run


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "word", ["", " ", "\t\n", " <pastel>", "<pastel> ", "a\0b", "...", "x" * 101]
)
def test_words_a_prompt_cannot_hold_are_refused_naming_the_file(word, tmp_path):
    path = save_embedding(tmp_path / "style.safetensors", torch.zeros(1, 64), word)
    with pytest.raises(CheckpointError, match="style.safetensors: its trigger word"):
        read_embedding(path)


def test_a_words_stem_is_checked_too_and_good_words_pass(tmp_path):
    path = tmp_path / "...safetensors"  # stem "..", no metadata word
    files.save_state(path, {"emb_params": torch.zeros(1, 64)})
    with pytest.raises(CheckpointError, match="no letter or digit"):
        read_embedding(path)
    for word in ("<pastel>", "my style", "ü-art", "sks"):
        assert (
            read_embedding(save_embedding(tmp_path / "w.safetensors", torch.zeros(1, 64), word))[1]
            == word
        )


def test_words_that_contain_one_another_are_refused():
    check_words([("a.pt", "<pastel>"), ("b.pt", "<ink>")])
    with pytest.raises(
        CheckpointError, match="b.pt: its trigger word 'pastel' and '<pastel>' of a.pt"
    ):
        check_words([("a.pt", "<pastel>"), ("b.pt", "pastel")])
    with pytest.raises(CheckpointError, match="contain one another"):
        check_words([("a.pt", "<Ink>"), ("b.pt", "<ink>")])


def test_garbage_and_code_running_pickles_are_one_line_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "random.pt").write_bytes(os.urandom(300))
    torch.save({"string_to_param": {"*": Evil(marker)}}, tmp_path / "zip.pt")
    with open(tmp_path / "raw.bin", "wb") as f:
        pickle.dump({"<x>": Evil(marker)}, f)
    (tmp_path / "random.safetensors").write_bytes(os.urandom(300))
    for name in ("random.pt", "zip.pt", "raw.bin", "random.safetensors"):
        with pytest.raises(CheckpointError, match=re.escape(name)) as e:
            read_embedding(tmp_path / name)
        assert "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "value, why",
    [
        ("text", "not a tensor"),
        (torch.zeros(2, 3, 64), "expected float vectors"),
        (torch.zeros(1, 64, dtype=torch.int64), "expected float vectors"),
        (torch.zeros(0, 64), "expected float vectors"),
        (torch.zeros(76, 64), "76 vectors"),
        (torch.full((1, 64), float("nan")), "NaN"),
    ],
)
def test_vectors_of_the_wrong_kind_are_refused(value, why, tmp_path):
    torch.save({"string_to_param": {"*": value}}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=f"w.pt: .*{why}"):
        read_embedding(tmp_path / "w.pt")


def test_a_missing_file_and_a_pickle_of_no_dict(tmp_path):
    with pytest.raises(CheckpointError, match="embedding file .* does not exist"):
        read_embedding(tmp_path / ("x" * 300 + ".pt"))
    torch.save([torch.zeros(1, 64)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt: holds a list"):
        read_embedding(tmp_path / "list.pt")
