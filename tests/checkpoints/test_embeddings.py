"""Textual-inversion words: our tokenizer and text encoder with new words against diffusers'
`load_textual_inversion` on the same exported model, and A1111's file format."""

import pytest
import torch

from ldm.checkpoints import layout, load_model
from ldm.checkpoints.embeddings import read_embedding, save_embedding
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
