"""The CLIP tokenizer built from open-clip-torch's BPE file gives the real token ids."""

from __future__ import annotations

from dreambooth.models.tokenizer import clip_tokenizer


def test_known_words_have_their_real_ids():
    tokenizer = clip_tokenizer("sd1")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert tokenizer.tokenize("sks") == ["sks</w>"]  # one token: the guide's (rifle) example


def test_made_up_names_split_into_several_tokens():
    assert len(clip_tokenizer().tokenize("zwxqklyvor")) > 1


def test_padding_follows_the_family():
    sd1 = clip_tokenizer("sd1")("dog", padding="max_length", max_length=6).input_ids
    sd2 = clip_tokenizer("sd2")("dog", padding="max_length", max_length=6).input_ids
    assert sd1 == [49406, 1929, 49407, 49407, 49407, 49407]
    assert sd2 == [49406, 1929, 49407, 0, 0, 0]
