"""``prepare_folder`` and ``python -m dreambooth prepare`` on odd images drawn in tmp_path (offline, fast)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile

from dreambooth.cli import main
from dreambooth.data.buckets import closest_bucket, generate_buckets
from dreambooth.data.prepare import (
    PrepareReport,
    crop_box,
    entropy_offset,
    load_focal_points,
    parse_colour,
    prepare_folder,
)
from dreambooth.errors import DreamBoothError

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
SIZE = 48
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 128, 0)


@pytest.fixture(autouse=True)
def pil_globals_untouched():
    yield
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == ORIGINAL_MAX_IMAGE_PIXELS


def noise(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: relative path -> (bytes, mtime in ns)."""
    return {
        path.relative_to(folder).as_posix(): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def make_odd_folder(src: Path) -> Path:
    """The zoo of awkward inputs; returns ``src``."""
    (src / "people").mkdir(parents=True)
    noise(60, 90, seed=1).save(src / "portrait.png")
    noise(120, 80, seed=2).save(src / "people" / "landscape.jpg", quality=90)
    noise(40, 30, seed=3).save(src / "tiny.png")
    large = Image.new("RGB", (3000, 2000), (90, 140, 200))
    ImageDraw.Draw(large).ellipse((1000, 500, 2000, 1500), fill=(250, 200, 40))
    large.save(src / "large.jpg", quality=80)
    rgba = Image.new("RGBA", (80, 80), (0, 0, 0, 0))  # fully transparent *black* border: must not darken anything
    rgba.paste((255, 0, 0, 255), (20, 20, 60, 60))
    rgba.save(src / "logo.png")
    Image.new("CMYK", (70, 50), (0, 255, 255, 0)).save(src / "print.jpg", quality=95)  # CMYK red
    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    sixteen = Image.fromarray(gradient)
    if sixteen.mode != "I;16":
        sixteen = sixteen.convert("I;16")
    sixteen.save(src / "depth16.png")
    stored = Image.new("RGB", (80, 60), BLUE)  # stored landscape; EXIF 6 shows it as a 60x80 portrait
    stored.paste(RED, (0, 0, 40, 20))  # marker in the stored top-left corner -> displayed top-right
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(src / "people" / "phone.jpg", exif=exif.tobytes(), quality=95)
    buffer = src / "whole.png"
    noise(50, 50, seed=4).save(buffer)
    data = buffer.read_bytes()
    buffer.unlink()
    (src / "truncated.png").write_bytes(data[: len(data) // 2])
    (src / "notes.png").write_text("this is a text file, not a picture\n")
    shutil.copyfile(src / "portrait.png", src / "portrait_copy.png")
    (src / "portrait.txt").write_bytes("a photo of zwx person,\r\n  smiling\xe9".encode("cp1252"))
    return src


@pytest.fixture
def odd_folder(tmp_path) -> Path:
    return make_odd_folder(tmp_path / "src")


def by_name(report: PrepareReport) -> dict[str, object]:
    return {image.source.relative_to(report.source).as_posix(): image for image in report.written}


# --- the whole zoo, square ---------------------------------------------------------------------------------------


def test_square_prepare_of_odd_images(odd_folder, tmp_path):
    before = snapshot(odd_folder)
    dst = tmp_path / "dst"
    calls = []
    report = prepare_folder(odd_folder, dst, size=SIZE, progress=lambda *args: calls.append(args))

    assert snapshot(odd_folder) == before  # SRC byte-identical, same mtimes
    written = by_name(report)
    assert sorted(written) == [
        "depth16.png",
        "large.jpg",
        "logo.png",
        "people/landscape.jpg",
        "people/phone.jpg",
        "portrait.png",
        "print.jpg",
        "tiny.png",
    ]
    for image in report.written:
        assert image.output.is_file() and image.output.suffix == ".png"
        assert image.output.stem == image.source.stem
        with Image.open(image.output) as output:
            assert output.size == (SIZE, SIZE) and output.mode == "RGB"
    assert (dst / "people" / "landscape.png").is_file()  # sub-folders kept
    assert [c[:2] for c in calls] == [(i, 11) for i in range(1, 12)]

    assert [image.source.name for image in report.upscaled] == ["tiny.png"]
    problems = "\n".join(report.problems())
    assert "tiny.png: upscaled from 40x30" in problems

    unreadable = {problem.path.name: problem.reason for problem in report.unreadable}
    assert set(unreadable) == {"notes.png", "truncated.png"}
    assert "not an image" in unreadable["notes.png"]
    assert "truncated" in unreadable["truncated.png"]
    assert [(p.path.name, p.other.name) for p in report.duplicates] == [("portrait_copy.png", "portrait.png")]
    assert "same content as portrait.png; skipped" in report.duplicates[0].reason
    assert not (dst / "portrait_copy.png").exists()
    assert (dst / "portrait.txt").read_bytes() == (odd_folder / "portrait.txt").read_bytes()  # caption copied
    assert report.captions == [dst / "portrait.txt"]

    with Image.open(dst / "people" / "phone.png") as phone:  # EXIF 6: the red marker is now top-right
        top_right, top_left, bottom_right = phone.getpixel((44, 6)), phone.getpixel((6, 6)), phone.getpixel((44, 40))
    assert top_right[0] > 200 and top_right[2] < 60
    assert top_left[2] > 200 and top_left[0] < 60
    assert bottom_right[2] > 200 and bottom_right[0] < 60

    with Image.open(dst / "print.png") as cmyk:
        red, green, blue = cmyk.getpixel((SIZE // 2, SIZE // 2))
    assert red > 200 and green < 60 and blue < 60
    with Image.open(dst / "depth16.png") as depth:
        row = np.asarray(depth)[SIZE // 2, :, 0].astype(int)
    assert row[0] < 60 and row[-1] > 195 and np.all(np.diff(row) >= -2)  # a scaled gradient, not clipped to white

    with Image.open(dst / "logo.png") as logo:
        pixels = np.asarray(logo)
    assert tuple(pixels[1, 1]) == (255, 255, 255)  # the transparent border became the background
    assert pixels[..., 0].min() >= 250  # red on white: no dark fringe anywhere (the red channel stays 255)


def test_caption_copied_unchanged_beside_its_output(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    noise(40, 40).save(src / "sub" / "me.jpg")
    caption = "zwx person,\r\n  at the beach \xe9".encode("cp1252")
    (src / "sub" / "me.txt").write_bytes(caption)
    report = prepare_folder(src, tmp_path / "dst", size=32, image_format="jpg")
    assert (tmp_path / "dst" / "sub" / "me.txt").read_bytes() == caption
    assert report.captions == [tmp_path / "dst" / "sub" / "me.txt"]
    assert report.written[0].output == tmp_path / "dst" / "sub" / "me.jpg"
    assert "1 caption(s) copied" in report.summary()


@pytest.mark.parametrize("image_format", ["png", "jpg", "webp"])
def test_output_formats(tmp_path, image_format):
    src = tmp_path / "src"
    src.mkdir()
    noise(50, 30).save(src / "a.bmp")
    report = prepare_folder(src, tmp_path / "dst", size=24, image_format=image_format)
    output = report.written[0].output
    assert output.name == f"a.{image_format}"
    with Image.open(output) as image:
        assert image.format == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[image_format]
        assert image.size == (24, 24)
    assert not [p for p in (tmp_path / "dst").iterdir() if p.name.startswith(".")]  # no temporary file left


def test_name_clash_is_reported_and_nothing_overwritten(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (20, 20), RED).save(src / "a.jpg", quality=95)
    Image.new("RGB", (20, 20), BLUE).save(src / "a.png")
    report = prepare_folder(src, tmp_path / "dst", size=16)
    assert [image.source.name for image in report.written] == ["a.jpg"]
    assert [(p.path.name, p.other.name) for p in report.name_clashes] == [("a.png", "a.jpg")]
    assert "would be written as a.png" in report.name_clashes[0].reason
    with Image.open(tmp_path / "dst" / "a.png") as image:
        assert image.getpixel((8, 8))[0] > 200  # still the red a.jpg


# --- buckets -------------------------------------------------------------------------------------------------------


def test_bucket_mode_outputs_exactly_the_closest_bucket(odd_folder, tmp_path):
    (odd_folder / "wide.png").parent.mkdir(exist_ok=True)
    noise(200, 100, seed=9).save(odd_folder / "wide.png")  # 2:1
    report = prepare_folder(odd_folder, tmp_path / "dst", size=256, bucket=True)
    buckets = generate_buckets(256)
    for image in report.written:
        expected = closest_bucket(*image.original_size, buckets)
        assert image.size == (expected.width, expected.height)
        with Image.open(image.output) as output:
            assert output.size == image.size
    wide = by_name(report)["wide.png"]
    assert wide.size[0] > wide.size[1] and wide.size == (320, 192)
    assert by_name(report)["people/phone.jpg"].size[1] > by_name(report)["people/phone.jpg"].size[0]  # upright
    assert "bucket, may look soft); written" in "\n".join(report.problems())  # small ones are upscaled


def test_bucket_mode_needs_a_bucket_friendly_size(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(DreamBoothError, match="multiple of 32"):
        prepare_folder(tmp_path / "src", tmp_path / "dst", size=100, bucket=True)


# --- crops ---------------------------------------------------------------------------------------------------------


def detailed_patch_on_the_right() -> Image.Image:
    image = Image.new("RGB", (300, 100), (120, 120, 120))
    image.paste(noise(60, 100, seed=5), (230, 0))  # detail on the far right, flat grey elsewhere
    return image


def test_entropy_crop_contains_the_detailed_patch(tmp_path):
    image = detailed_patch_on_the_right()
    left, top, right, bottom = crop_box(image, (SIZE, SIZE), "entropy")
    assert (top, bottom) == (0, 100) and left <= 230 and right >= 290
    assert crop_box(image, (SIZE, SIZE), "center")[0] == 100
    src = tmp_path / "src"
    src.mkdir()
    image.save(src / "patch.png")
    prepare_folder(src, tmp_path / "dst", size=SIZE, crop="entropy")
    with Image.open(tmp_path / "dst" / "patch.png") as output:
        pixels = np.asarray(output).astype(int)
    assert pixels[:, 18:40].std() > 15  # the noisy patch (source x 230-290) is in the crop (source x 200-300)
    assert pixels[:, :8].std() < 3


def test_entropy_crop_of_a_flat_or_vertical_image_keeps_the_centre():
    flat = Image.new("RGB", (100, 300), (10, 200, 30))
    assert entropy_offset(flat, (SIZE, SIZE)) == 100
    tall = Image.new("RGB", (100, 300), (120, 120, 120))
    tall.paste(noise(100, 50, seed=6), (0, 0))  # detail at the top
    assert crop_box(tall, (SIZE, SIZE), "entropy")[1] == 0


def test_focal_crop_is_centred_on_the_point_and_clamped(tmp_path):
    image = Image.new("RGB", (400, 100), (0, 0, 0))
    assert crop_box(image, (SIZE, SIZE), "focal", (0.5, 0.5)) == (150, 0, 250, 100)
    assert crop_box(image, (SIZE, SIZE), "focal", (0.3, 0.5)) == (70, 0, 170, 100)  # centred on x = 120
    assert crop_box(image, (SIZE, SIZE), "focal", (0.02, 0.5)) == (0, 0, 100, 100)  # clamped inside
    assert crop_box(image, (SIZE, SIZE), "focal", (1.0, 0.5)) == (300, 0, 400, 100)

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    marked = Image.new("RGB", (400, 100), BLUE)
    marked.paste(RED, (110, 40, 130, 60))  # a red square centred on (120, 50) = (0.3, 0.5)
    marked.save(src / "sub" / "m.png")
    Image.new("RGB", (100, 40), BLUE).save(src / "nopoint.png")
    focal_file = tmp_path / "focal.json"
    focal_file.write_text(json.dumps({"sub\\m.png": [0.3, 0.5], "gone.jpg": [0.5, 0.5]}))
    report = prepare_folder(src, tmp_path / "dst", size=SIZE, crop="focal", focal_points=load_focal_points(focal_file))
    with Image.open(tmp_path / "dst" / "sub" / "m.png") as output:
        assert output.getpixel((SIZE // 2, SIZE // 2))[0] > 200  # the point is in the middle of the output
        assert output.getpixel((4, SIZE // 2))[2] > 200
    assert [p.path.name for p in report.focal_fallbacks] == ["nopoint.png"]
    assert report.unused_focal_points == ["gone.jpg"]
    lines = "\n".join(report.problems())
    assert "nopoint.png: has no focal point" in lines and "gone.jpg (focal file): matches no image" in lines


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"a.jpg": [0.5]}', "a.jpg"),
        ('{"a.jpg": [1.5, 0.5]}', "between 0 and 1"),
        ('{"a.jpg": "middle"}', "between 0 and 1"),
    ],
)
def test_bad_focal_file(tmp_path, content, message):
    path = tmp_path / "focal.json"
    path.write_text(content)
    with pytest.raises(DreamBoothError, match=message) as info:
        load_focal_points(path)
    assert str(path) in str(info.value)


# --- refusals ------------------------------------------------------------------------------------------------------


def test_decompression_bomb_is_refused_with_a_reason(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    noise(20, 20).save(src / "small.png")  # 400 px: fine
    noise(40, 40).save(src / "bomb.png")  # 1600 px: above 2 x the limit below, PIL refuses it
    noise(30, 20).save(src / "warn.png")  # 600 px: PIL only warns; load_image refuses it as well
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    report = prepare_folder(src, tmp_path / "dst", size=16)
    assert [image.source.name for image in report.written] == ["small.png"]
    reasons = {problem.path.name: problem.reason for problem in report.unreadable}
    assert set(reasons) == {"bomb.png", "warn.png"}
    assert all("decompression bomb" in reason for reason in reasons.values())


@pytest.mark.parametrize("where", ["inside", "same", "parent"])
def test_destination_inside_or_around_the_source_is_refused(tmp_path, where):
    src = tmp_path / "src"
    src.mkdir()
    noise(20, 20).save(src / "a.png")
    dst = {"inside": src / "out", "same": src, "parent": tmp_path}[where]
    before = snapshot(src)
    with pytest.raises(DreamBoothError, match="destination") as info:
        prepare_folder(src, dst, size=16, overwrite=True)
    assert str(dst) in str(info.value)
    assert snapshot(src) == before and not (src / "out").exists()


def test_non_empty_destination_needs_overwrite(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    noise(20, 20).save(src / "a.png")
    (dst / "a.png").write_bytes(b"old")
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(DreamBoothError, match="not empty") as info:
        prepare_folder(src, dst, size=16)
    assert str(dst) in str(info.value) and (dst / "a.png").read_bytes() == b"old"
    report = prepare_folder(src, dst, size=16, overwrite=True)
    assert len(report.written) == 1 and (dst / "a.png").read_bytes() != b"old"
    assert (dst / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DreamBoothError, match="is a file"):
        prepare_folder(src, tmp_path / "file", size=16, overwrite=True)
    with pytest.raises(DreamBoothError, match="does not exist"):
        prepare_folder(tmp_path / "missing", tmp_path / "d2")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"crop": "smart"}, "crop 'smart'"),
        ({"image_format": "gif"}, "format 'gif'"),
        ({"size": 0}, "size 0"),
        ({"crop": "focal"}, "focal points"),
        ({"focal_points": {"a.png": (0.5, 0.5)}}, "only used with crop 'focal'"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(tmp_path, options, message):
    (tmp_path / "src").mkdir()
    with pytest.raises(DreamBoothError, match=message):
        prepare_folder(tmp_path / "src", tmp_path / "dst", **options)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    "text, colour",
    [("#ffffff", (255, 255, 255)), ("#0a0", (0, 170, 0)), ("0, 128,0", (0, 128, 0)), ("white", (255, 255, 255))],
)
def test_parse_colour(text, colour):
    assert parse_colour(text) == colour


@pytest.mark.parametrize("text", ["#ffffff80", "256,0,0", "1,2", "nope", ""])
def test_parse_colour_refuses(text):
    with pytest.raises(DreamBoothError, match="#RRGGBB"):
        parse_colour(text)


# --- command line --------------------------------------------------------------------------------------------------


def test_cli_prepare_summary_background_and_exit_codes(odd_folder, tmp_path, capsys):
    dst = tmp_path / "dst"
    code = main(["prepare", str(odd_folder), str(dst), "--size", "48", "--background", "0,128,0", "--format", "jpg"])
    out = capsys.readouterr().out
    assert code == 0
    assert "8 image(s) written (48x48, center crop, jpg), 1 caption(s) copied" in out
    assert "4 problem(s):" in out
    assert "tiny.png: upscaled from 40x30" in out
    assert "notes.png: is not an image file" in out and "truncated.png: cannot be read" in out
    assert "portrait_copy.png: same content as portrait.png" in out
    with Image.open(dst / "logo.jpg") as logo:
        assert all(abs(a - b) <= 6 for a, b in zip(logo.getpixel((1, 1)), GREEN))  # the --background colour

    assert main(["prepare", str(odd_folder), str(dst)]) == 2  # DST not empty
    assert "not empty" in capsys.readouterr().err
    assert main(["prepare", str(odd_folder), str(tmp_path / "d2"), "--background", "#12"]) == 2
    assert "#RRGGBB" in capsys.readouterr().err
    assert main(["prepare", str(odd_folder), str(tmp_path / "d3"), "--crop", "focal"]) == 2
    assert "--focal-file" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["prepare", str(empty), str(tmp_path / "d4")]) == 1
    assert "no image was written" in capsys.readouterr().err


def test_cli_prepare_subprocess_with_focal_file_and_buckets(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    noise(120, 60).save(src / "wide.png")
    focal = tmp_path / "focal.json"
    focal.write_text('{"wide.png": [0.9, 0.5]}')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dreambooth",
            "prepare",
            str(src),
            str(tmp_path / "dst"),
            "--bucket",
            "--size",
            "64",
            "--focal-file",
            str(focal),
            "--format",
            "webp",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "1 image(s) written (64 px aspect buckets, focal crop, webp)" in result.stdout
    with Image.open(tmp_path / "dst" / "wide.webp") as output:
        assert output.size == (64, 64)  # 64 px resolution: the only bucket is 64x64
