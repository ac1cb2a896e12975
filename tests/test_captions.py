"""Caption files in odd encodings, captions from file names, and how a caption joins the prompt."""

from __future__ import annotations

import pytest

from dreambooth.data.captions import (
    CAPTION_SOURCES,
    caption_from_filename,
    image_caption,
    read_caption_file,
    render_prompt,
)


def write_caption(tmp_path, data: bytes, stem="img"):
    image = tmp_path / f"{stem}.png"
    image.write_bytes(b"")
    (tmp_path / f"{stem}.txt").write_bytes(data)
    return image


TEXT = "café’s “menu” – naïve"  # curly quotes and the dash are where cp1252 and latin-1 differ


@pytest.mark.parametrize(
    "data",
    [
        TEXT.encode(),
        TEXT.encode("utf-8-sig"),
        TEXT.encode("utf-16"),  # with BOM
        b"\xfe\xff" + TEXT.encode("utf-16-be"),
        TEXT.encode("cp1252"),
        TEXT.encode("utf-16-le"),  # no BOM
    ],
    ids=["utf-8", "utf-8-sig", "utf-16", "utf-16-be-bom", "cp1252", "utf-16-le-no-bom"],
)
def test_caption_encodings(tmp_path, data):
    assert read_caption_file(write_caption(tmp_path, data)) == TEXT


def test_undecodable_bytes_never_crash(tmp_path):
    caption = read_caption_file(write_caption(tmp_path, b"dog \x81\x8d\x90 cat"))
    assert caption.startswith("dog ") and caption.endswith(" cat")


def test_whitespace_collapsed(tmp_path):
    image = write_caption(tmp_path, b"  a photo\r\nof\t\tsks   dog \n\n")
    assert read_caption_file(image) == "a photo of sks dog"


def test_missing_and_empty_caption_files(tmp_path):
    assert read_caption_file(tmp_path / "alone.png") is None
    assert read_caption_file(write_caption(tmp_path, b"", stem="empty")) is None
    assert read_caption_file(write_caption(tmp_path, b" \n\t ", stem="blank")) is None
    assert read_caption_file(write_caption(tmp_path, "\ufeff".encode(), stem="bom")) is None


def test_caption_file_has_same_stem_only(tmp_path):
    image = tmp_path / "dog.png"
    (tmp_path / "dog.png.txt").write_text("wrong")
    assert read_caption_file(image) is None
    (tmp_path / "dog.txt").write_text("right")
    assert read_caption_file(image) == "right"
    assert read_caption_file(tmp_path / "dog.JPG") == "right"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dog (1).png", "dog"),
        ("dog(12).jpg", "dog"),
        ("dog_01.png", "dog"),
        ("dog-002.png", "dog"),
        ("dog 3.png", "dog"),
        ("dog - Copy (2).png", "dog"),
        ("a_photo-of__sks   dog (4).webp", "a photo of sks dog"),
        ("dog_01 (1).png", "dog"),
        ("2 dogs playing.png", "2 dogs playing"),
        ("001.png", "001"),
    ],
)
def test_caption_from_filename(name, expected):
    assert caption_from_filename(f"/data/{name}") == expected


def test_image_caption_sources(tmp_path):
    image = write_caption(tmp_path, b"from the file", stem="sks_dog_01")
    assert image_caption(image, "txt") == "from the file"
    assert image_caption(image, "filename") == "sks dog"
    assert image_caption(image, "prompt") is None
    assert CAPTION_SOURCES == ("prompt", "txt", "filename")


def test_unknown_caption_source(tmp_path):
    with pytest.raises(ValueError) as info:
        image_caption(tmp_path / "a.png", "exif")
    for allowed in CAPTION_SOURCES:
        assert allowed in str(info.value)
    assert "exif" in str(info.value)


def test_filewords_substitution_skips_template():
    assert render_prompt("photo of [filewords]", "sks dog on grass") == "photo of sks dog on grass"
    assert render_prompt("photo of [filewords]", "sks dog", template="[P] in the style of [PX]") == "photo of sks dog"
    assert render_prompt("[filewords], high quality", None) == "high quality"
    assert render_prompt("photo of [filewords]", None) == "photo of"


def test_no_caption_returns_prompt():
    assert render_prompt("a photo of sks dog", None) == "a photo of sks dog"
    assert render_prompt("a photo of sks dog", "") == "a photo of sks dog"
    assert render_prompt("a photo of sks dog", "   ", template="[P] by [PX]") == "a photo of sks dog"


def test_default_template_joins_adjacent_placeholders():
    assert render_prompt("sks dog", "on the beach") == "sks dog, on the beach"
    assert render_prompt("sks dog", "on the beach", template="[P][PX]") == "on the beach, sks dog"


def test_custom_template_keeps_literal_text():
    result = render_prompt("sks style", "a castle", template="[P] in the style of [PX]")
    assert result == "a castle in the style of sks style"
    assert render_prompt("sks", "a cat", template="art: [PX] / [P]!") == "art: sks / a cat!"


def test_placeholders_inside_values_are_not_expanded():
    assert render_prompt("[P] sks", "a [PX] sign", template="[PX] | [P]") == "[P] sks | a [PX] sign"


def test_empty_prompt_leaves_no_comma_artefacts():
    assert render_prompt("", "a dog") == "a dog"
    assert render_prompt("", "a dog", template="[P][PX]") == "a dog"
    assert render_prompt("  sks   dog ", "on  grass") == "sks dog, on grass"
