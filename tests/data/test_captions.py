"""Captions from untrusted shards: a huge one is cut before tokenizing, a normal one is not
changed by the cut (`ldm.models.text_encoder.cut_prompt`, applied in `TextEncoder.tokenize`,
which every caption and prompt goes through)."""

import pytest
import torch

from ldm.models.text_encoder import CHARS_PER_TOKEN, TextEncoder, cut_prompt

WORDS = (
    "a photograph of an astronaut riding a horse on the moon, highly detailed, 4k, trending "
    "on artstation, by greg rutkowski &amp; alphonse mucha, supercalifragilisticexpialidocious "
    "pneumonoultramicroscopicsilicovolcanoconiosis 東京の夜景 ☃ "
)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(text_cfg=dict(width=32, heads=2, layers=1, context_length=77))


def test_the_bound_holds_for_the_vocabulary(encoder):
    """CHARS_PER_TOKEN assumes no token stands for more than 32 characters."""
    longest = max(len(token.removesuffix("</w>")) for token in encoder.tokenizer.encoder)
    assert longest <= 32 and CHARS_PER_TOKEN >= 4 * (longest + 1)


@pytest.mark.parametrize("repeats", [1, 4, 60, 400])  # ~200 characters to ~80 000
def test_the_cut_leaves_the_tokens_of_a_caption_as_they_were(encoder, repeats):
    caption = WORDS * repeats
    uncut = encoder.tokenizer([caption], context_length=77)  # open_clip's own, whole
    assert torch.equal(encoder.tokenize([caption]), uncut)
    assert len(cut_prompt(caption, 77)) == min(len(caption), CHARS_PER_TOKEN * 77)


def test_a_caption_of_whitespace_runs_and_entities_keeps_its_tokens(encoder):
    caption = "".join(f"word{i} \n\t  &amp;  " for i in range(3000))
    assert torch.equal(encoder.tokenize([caption]), encoder.tokenizer([caption], 77))


def test_a_10_mb_caption_reaches_the_tokenizer_cut(encoder, monkeypatch):
    seen, encode = [], encoder.tokenizer.encode

    def spy(text):
        seen.append(len(text))
        return encode(text)

    monkeypatch.setattr(encoder.tokenizer, "encode", spy)
    huge = "x" * 10_000_000
    ids = encoder.tokenize([huge, "a cat"])
    assert seen == [CHARS_PER_TOKEN * 77, 5]
    assert torch.equal(ids, encoder.tokenizer([huge[: CHARS_PER_TOKEN * 77], "a cat"], 77))
    with_words = TextEncoder(text_cfg=dict(width=32, heads=2, layers=1, context_length=77))
    with_words.add_embedding("<new-word>", torch.zeros(2, with_words.width))  # the other path
    monkeypatch.setattr(with_words.tokenizer, "encode", spy)
    seen.clear()
    with_words.tokenize(["<new-word> " + huge])
    assert sum(seen) <= CHARS_PER_TOKEN * 77
