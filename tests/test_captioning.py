"""Captioning a folder: IMAGE.txt beside each image (prefix/suffix, keep or overwrite, tag deduplication, unreadable
images, cancel) and the local BLIP captioner on a tiny randomly initialised model (offline, CPU)."""

from __future__ import annotations

import inspect

import pytest
from conftest import draw_subject
from PIL import Image

from dreambooth import cli
from dreambooth.data.captioning import (
    BlipCaptioner,
    caption_folder,
    compose_caption,
    images_to_caption,
)
from dreambooth.data.captions import read_caption_file
from dreambooth.errors import DreamBoothError


class StubCaptioner:
    """Returns ``text`` for every image and remembers what it was given."""

    def __init__(self, text="a red ring on grass"):
        self.text = text
        self.seen = []

    def __call__(self, image):
        self.seen.append((image.mode, image.size))
        return self.text


def txt_files(folder):
    return sorted(path.name for path in folder.rglob("*.txt"))


def test_one_caption_file_per_image_with_prefix_and_suffix(tmp_path):
    images = draw_subject(tmp_path / "imgs", count=3)
    (tmp_path / "imgs" / "sub").mkdir()
    nested = tmp_path / "imgs" / "sub" / "deep.png"
    Image.new("RGB", (16, 16)).save(nested)
    before = {path: path.read_bytes() for path in [*images, nested]}
    stub = StubCaptioner()
    report = caption_folder(tmp_path / "imgs", stub, prefix="ohwx dog", suffix="high quality")

    assert len(report.written) == 4 and not report.kept and not report.failed and not report.cancelled
    assert txt_files(tmp_path / "imgs") == ["deep.txt", "img_0.txt", "img_1.txt", "img_2.txt"]
    assert nested.with_suffix(".txt").is_file()  # beside its image, not in the top folder
    for path in images:
        assert path.with_suffix(".txt").read_text(encoding="utf-8") == "ohwx dog, a red ring on grass, high quality\n"
        assert read_caption_file(path) == "ohwx dog, a red ring on grass, high quality"
    assert all(mode == "RGB" for mode, _ in stub.seen)
    assert {path: path.read_bytes() for path in before} == before  # the images are untouched
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p.suffix not in (".png", ".txt")) == []
    assert "4 caption(s) written" in report.summary()


def test_existing_captions_are_kept_unless_overwrite(tmp_path):
    images = draw_subject(tmp_path, count=2, captions=["my own words"])
    stub = StubCaptioner()
    report = caption_folder(tmp_path, stub)
    assert report.kept == [path.with_suffix(".txt") for path in images] and not report.written
    assert stub.seen == []  # the captioner is not even called
    assert images[0].with_suffix(".txt").read_text() == "my own words"
    assert images_to_caption(tmp_path) == []
    assert images_to_caption(tmp_path, overwrite=True) == images

    report = caption_folder(tmp_path, stub, overwrite=True)
    assert len(report.written) == 2 and not report.kept
    assert images[0].with_suffix(".txt").read_text(encoding="utf-8") == "a red ring on grass\n"


def test_tags_are_deduplicated_against_themselves_and_the_prefix(tmp_path):
    draw_subject(tmp_path, count=1)
    stub = StubCaptioner("1girl, Solo, solo,  smile , ohwx,1GIRL, , best quality")
    caption_folder(tmp_path, stub, prefix="ohwx, ohwx", suffix="best quality")
    assert (tmp_path / "img_0.txt").read_text(encoding="utf-8") == "ohwx, 1girl, Solo, smile, best quality\n"

    caption_folder(tmp_path, stub, prefix="ohwx", suffix="best quality", overwrite=True, dedupe_tags=False)
    text = (tmp_path / "img_0.txt").read_text(encoding="utf-8")
    assert text == "ohwx, 1girl, Solo, solo, smile , ohwx,1GIRL, , best quality, best quality\n"
    assert compose_caption("a dog", "", "") == "a dog"
    assert compose_caption("", "ohwx dog", "") == "ohwx dog"


def test_an_unreadable_image_is_reported_and_the_others_are_captioned(tmp_path):
    draw_subject(tmp_path, count=2)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "empty.jpg").write_bytes(b"")
    report = caption_folder(tmp_path, StubCaptioner())
    assert sorted(problem.path.name for problem in report.failed) == ["broken.png", "empty.jpg"]
    assert all(problem.reason for problem in report.failed)
    assert txt_files(tmp_path) == ["img_0.txt", "img_1.txt"]


def test_captioner_errors_and_empty_captions_fail_only_that_image(tmp_path):
    draw_subject(tmp_path, count=3)
    answers = iter(["a ring", RuntimeError("out of memory"), "   "])

    def flaky(image):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    report = caption_folder(tmp_path, flaky, prefix="ohwx")
    assert [path.name for path in report.written] == ["img_0.txt"]
    reasons = {problem.path.name: problem.reason for problem in report.failed}
    assert "out of memory" in reasons["img_1.png"] and reasons["img_2.png"] == "the captioner returned no text"
    assert txt_files(tmp_path) == ["img_0.txt"]


def test_two_images_with_one_name_do_not_share_a_caption_file(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "dog.jpg")
    Image.new("RGB", (16, 16)).save(tmp_path / "dog.png")
    report = caption_folder(tmp_path, StubCaptioner())
    assert [path.name for path in report.written] == ["dog.txt"]
    assert [problem.path.name for problem in report.failed] == ["dog.png"]


def test_should_stop_cancels_between_images_and_progress_is_reported(tmp_path):
    draw_subject(tmp_path, count=4)
    seen = []
    report = caption_folder(
        tmp_path,
        StubCaptioner(),
        progress=lambda done, total, image: seen.append((done, total, image.name)),
        should_stop=lambda: len(seen) >= 2,
    )
    assert report.cancelled and len(report.written) == 2
    assert seen == [(1, 4, "img_0.png"), (2, 4, "img_1.png")]
    assert txt_files(tmp_path) == ["img_0.txt", "img_1.txt"]
    assert "cancelled" in report.summary()


def test_a_missing_folder_is_an_error(tmp_path):
    with pytest.raises(DreamBoothError, match="does not exist"):
        caption_folder(tmp_path / "nope", StubCaptioner())


# ---------------------------------------------------------------------------------------------------- local BLIP

WORDS = ["a", "an", "the", "dog", "cat", "red", "blue", "ring", "photo", "of", "on", "in", "grass", "sand", "sitting"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A randomly initialised BLIP captioning model (hidden 32, one layer, 32 px) saved with its processor."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("tiny-blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    if "vocab_file" in inspect.signature(BertTokenizer.__init__).parameters:  # transformers 4.x
        tokenizer = BertTokenizer(vocab_file=str(vocab_file))
    else:  # transformers 5.x builds it from the vocabulary itself
        tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(vocab)})
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {"vocab_size": len(vocab), "max_position_embeddings": 64, **small}
    text.update(bos_token_id=2, eos_token_id=3, sep_token_id=3, pad_token_id=0)
    config = BlipConfig(
        text_config=text,
        vision_config={"image_size": 32, "patch_size": 16, **small},
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(0)
    model_dir = folder / "model"
    BlipForConditionalGeneration(config).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return model_dir


def test_blip_captioner_loads_a_folder_and_captions(tiny_blip, tmp_path):
    captioner = BlipCaptioner(tiny_blip, max_new_tokens=8)
    caption = captioner(Image.new("RGB", (48, 40), (200, 30, 30)))
    assert caption and caption == " ".join(caption.split())  # random weights: any words of the vocabulary
    assert set(caption.split()) <= set(WORDS)
    assert captioner(Image.new("RGB", (48, 40), (200, 30, 30))) == caption  # greedy: deterministic
    draw_subject(tmp_path / "imgs", count=2)
    report = caption_folder(tmp_path / "imgs", captioner, prefix="ohwx ring")
    assert len(report.written) == 2 and not report.failed
    for path in report.written:
        assert path.read_text(encoding="utf-8").startswith("ohwx ring, ")


def test_the_caption_command_writes_captions(tiny_blip, tmp_path, capsys):
    draw_subject(tmp_path, count=2)
    status = cli.main(["caption", str(tmp_path), "--model", str(tiny_blip), "--prefix", "ohwx ring"])
    out = capsys.readouterr().out
    assert status == 0 and "2 caption(s) written" in out
    assert (tmp_path / "img_1.txt").read_text(encoding="utf-8").startswith("ohwx ring, ")
    assert cli.main(["caption", str(tmp_path), "--model", str(tiny_blip)]) == 0  # all kept: the model is not loaded
    assert "already has its caption" in capsys.readouterr().out


def test_a_missing_blip_model_says_where_to_put_one(tmp_path, capsys):
    with pytest.raises(DreamBoothError, match=r"Salesforce/blip-image-captioning-base.*--model FOLDER"):
        BlipCaptioner(tmp_path / "no-such-model")
    with pytest.raises(DreamBoothError, match="not a saved BLIP captioning model"):
        BlipCaptioner(tmp_path)  # a folder without config.json
    with pytest.raises(DreamBoothError, match="Hugging Face cache"):
        BlipCaptioner("nobody-has/this-blip-model")  # an id that is not cached: nothing is downloaded
    draw_subject(tmp_path / "imgs", count=1)
    assert cli.main(["caption", str(tmp_path / "imgs"), "--model", str(tmp_path / "nope")]) == 2
    assert "--model FOLDER" in capsys.readouterr().err
    assert not (tmp_path / "imgs" / "img_0.txt").exists()


def test_a_blip_folder_with_a_malicious_pickle_is_refused_in_one_line(tmp_path):
    """transformers' from_pretrained would unpickle pytorch_model.bin with plain torch.load (on torch < 2.6 that runs
    anything): our safe loader reads it first and refuses it."""
    import json
    import os

    import torch

    class Payload:
        def __init__(self, marker):
            self.marker = marker

        def __reduce__(self):
            return (os.system, (f"touch {self.marker}",))

    folder, marker = tmp_path / "blip", tmp_path / "payload-ran"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "blip"}))
    (folder / "preprocessor_config.json").write_text("{}")
    torch.save({"weight": torch.zeros(1), "x": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(DreamBoothError) as raised:
        BlipCaptioner(folder)
    message = str(raised.value)
    assert "\n" not in message and "pytorch_model.bin" in message and "refused" in message
    assert "weights_only" not in message
    assert not marker.exists()
