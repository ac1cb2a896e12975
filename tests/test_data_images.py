"""Odd images drawn in tmp_path: every one loads as a clean RGB image or is refused with a clear reason."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from dreambooth.data import images as images_module
from dreambooth.data.images import (
    ImageError,
    ImageProblem,
    check_images,
    image_content_hash,
    list_images,
    load_image,
    resize_and_crop,
)
from dreambooth.errors import DreamBoothError

ORIGINAL_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


def save(image, path, **options):
    image.save(path, **options)
    return path


def noise(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(autouse=True)
def pil_globals_untouched():
    yield
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == ORIGINAL_MAX_IMAGE_PIXELS


# --- shapes and modes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(40, 90), (90, 40), (8, 8)], ids=["portrait", "landscape", "tiny"])
def test_plain_rgb_sizes_are_kept(tmp_path, size):
    source = noise(*size)
    image = load_image(save(source, tmp_path / "a.png"))
    assert image.mode == "RGB"
    assert image.size == size
    assert np.array_equal(np.asarray(image), np.asarray(source))


def test_loaded_image_is_usable_after_the_file_is_gone(tmp_path):
    path = save(noise(16, 16), tmp_path / "a.png")
    image = load_image(path)
    path.unlink()
    assert image.getpixel((3, 3)) == noise(16, 16).getpixel((3, 3))


def test_rgba_transparent_area_becomes_background_and_semi_transparent_red_is_pink(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 0))  # fully transparent black: must not show as black
    rgba.paste((255, 0, 0, 128), (10, 0, 20, 10))  # half-transparent red on the right
    path = save(rgba, tmp_path / "t.png")
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((2, 5)) == (255, 255, 255)
    red, green, blue = image.getpixel((15, 5))
    assert red == 255
    assert 120 <= green <= 135 and 120 <= blue <= 135  # pink, not dark red
    assert load_image(path, background=(0, 128, 0)).getpixel((2, 5)) == (0, 128, 0)


def test_palette_with_transparency(tmp_path):
    palette_image = Image.new("P", (10, 10), 0)
    palette_image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black (transparent), index 1 blue
    palette_image.paste(1, (5, 0, 10, 10))
    path = save(palette_image, tmp_path / "p.png", transparency=0)
    image = load_image(path, background=(200, 100, 50))
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == (200, 100, 50)
    assert image.getpixel((8, 8)) == (0, 0, 255)


def test_la_image(tmp_path):
    la = Image.new("LA", (10, 10), (0, 0))
    la.paste((100, 255), (5, 0, 10, 10))
    image = load_image(save(la, tmp_path / "la.png"))
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == (255, 255, 255)
    assert image.getpixel((8, 8)) == (100, 100, 100)


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    image = load_image(save(cmyk, tmp_path / "c.jpg", quality=95))
    assert image.mode == "RGB"
    red, green, blue = image.getpixel((8, 8))
    assert red > 200 and green < 60 and blue < 60


def test_sixteen_bit_gradient_is_scaled_not_clipped(tmp_path):
    gradient = (np.arange(256, dtype=np.uint16) * 257).reshape(1, 256).repeat(4, axis=0)  # 0 .. 65535
    path = save(Image.fromarray(gradient), tmp_path / "g16.png")
    with Image.open(path) as raw:
        assert raw.mode in ("I", "I;16")  # really a 16-bit file
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (4, 256, 3)
    row = pixels[0, :, 0].astype(int)
    assert (pixels != 255).any()
    assert np.all(np.diff(row) >= 0)  # ordering preserved
    assert row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 1


def test_grayscale_and_one_bit(tmp_path):
    gray = load_image(save(Image.new("L", (6, 6), 77), tmp_path / "l.png"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    bits = Image.new("1", (6, 6), 0)
    bits.paste(1, (3, 0, 6, 6))
    image = load_image(save(bits, tmp_path / "b.bmp"))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((5, 5)) == (255, 255, 255)


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    stored = Image.new("RGB", (60, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 15, 10))  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(stored, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    image = load_image(path)
    assert image.size == (40, 60)
    top_right = image.getpixel((36, 3))
    top_left = image.getpixel((3, 3))
    assert top_right[0] > 200 and top_right[2] < 60  # the red corner went to the top right
    assert top_left[2] > 200 and top_left[0] < 60


# --- refused files ---------------------------------------------------------------------------------------------


def test_truncated_png(tmp_path):
    full = save(noise(64, 64), tmp_path / "full.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert "truncated" in info.value.reason
    assert str(info.value) == f"{path}: {info.value.reason}"
    assert info.value.path == path
    assert isinstance(info.value, DreamBoothError)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not an image"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.png")


def test_image_above_max_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    path = save(noise(20, 10), tmp_path / "big.png")
    monkeypatch.setattr(images_module, "MAX_PIXELS", 199)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or None)
    with pytest.raises(ImageError, match="too large") as info:
        load_image(path)
    assert "20x10" in info.value.reason
    assert decoded == []
    monkeypatch.undo()
    monkeypatch.setattr(images_module, "MAX_PIXELS", 200)
    assert load_image(path).size == (20, 10)


@pytest.mark.parametrize("pixels", [20 * 4, 20 * 10], ids=["pil-warning", "pil-error"])
def test_pil_decompression_bomb_checks_become_image_errors(tmp_path, monkeypatch, pixels):
    path = save(noise(20, pixels // 20), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # PIL warns above 50 px and raises above 100 px
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match="too large"):
            load_image(path)


# --- check_images ----------------------------------------------------------------------------------------------


def test_check_images_reports_every_problem(tmp_path):
    good = save(noise(32, 32), tmp_path / "good.png")
    small = save(noise(32, 12), tmp_path / "small.png")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("hello")
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:-400])
    problems = check_images([good, small, empty, text, cut], min_size=16)
    assert [problem.path for problem in problems] == [small, empty, text, cut]
    assert all(isinstance(problem, ImageProblem) for problem in problems)
    by_path = {problem.path: problem.reason for problem in problems}
    assert by_path[small] == "too small: 32x12, the shorter side is below 16 px"
    assert "empty" in by_path[empty]
    assert "not an image" in by_path[text]
    assert "truncated" in by_path[cut]


def test_check_images_all_fine(tmp_path):
    paths = [save(noise(8, 8, seed), tmp_path / f"{seed}.png") for seed in range(3)]
    assert check_images(paths) == []
    assert check_images(paths, min_size=8) == []


# --- list_images -----------------------------------------------------------------------------------------------


def test_list_images_recursive_case_insensitive_skips_hidden(tmp_path):
    for name in [
        "b.PNG",
        "a.jpg",
        "c.JpEg",
        "d.webp",
        "e.BMP",
        "sub/f.png",
        "sub/deeper/g.jpeg",
        "notes.txt",
        "h.gif",
        ".hidden.png",
        ".cache/i.png",
        "sub/.thumbs/j.png",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = [path.relative_to(tmp_path).as_posix() for path in list_images(tmp_path)]
    assert found == ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "e.BMP", "sub/deeper/g.jpeg", "sub/f.png"]
    assert list_images(str(tmp_path)) == list_images(tmp_path)


def test_list_images_missing_folder(tmp_path):
    with pytest.raises(DreamBoothError, match="does not exist"):
        list_images(tmp_path / "absent")
    assert list_images(tmp_path) == []


# --- resize_and_crop -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "size", "expected"),
    [
        ((300, 200), 64, (64, 64)),
        ((200, 300), 64, (64, 64)),
        ((8, 8), 64, (64, 64)),
        ((300, 200), (96, 48), (96, 48)),
        ((300, 200), (48, 96), (48, 96)),
        ((333, 111), (77, 55), (77, 55)),
    ],
)
def test_resize_and_crop_exact_size(source, size, expected):
    image = noise(*source)
    assert resize_and_crop(image, size).size == expected
    assert resize_and_crop(image, size, center_crop=False, rng=random.Random(1)).size == expected


def bands(width=300, height=100):
    """Red left third, green middle third, blue right third."""
    image = Image.new("RGB", (width, height), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, width // 3, height))
    image.paste((0, 0, 255), (2 * width // 3, 0, width, height))
    return image


def test_center_crop_keeps_the_middle():
    pixels = np.asarray(resize_and_crop(bands(), 50)).astype(int)
    assert pixels.shape == (50, 50, 3)
    assert (pixels[:, :, 1] > 200).all() and (pixels[:, :, 0] < 50).all() and (pixels[:, :, 2] < 50).all()


def test_cover_scaling_does_not_letterbox():
    pixels = np.asarray(resize_and_crop(bands(300, 100), (150, 100))).astype(int)
    assert pixels[:, :10, 0].min() > 200  # left edge still red: scaled to cover, cropped 75 px each side
    assert pixels[:, -10:, 2].min() > 200


def test_random_crop_is_deterministic_per_seed_and_varies_across_seeds():
    wide = noise(400, 50)
    first = np.asarray(resize_and_crop(wide, 50, center_crop=False, rng=random.Random(7)))
    again = np.asarray(resize_and_crop(wide, 50, center_crop=False, rng=random.Random(7)))
    assert np.array_equal(first, again)
    crops = {resize_and_crop(wide, 50, center_crop=False, rng=random.Random(seed)).tobytes() for seed in range(8)}
    assert len(crops) > 1


def test_random_crop_needs_rng():
    with pytest.raises(ValueError, match="rng"):
        resize_and_crop(noise(10, 10), 5, center_crop=False)


# --- hashing ---------------------------------------------------------------------------------------------------


def test_image_content_hash_follows_content(tmp_path):
    first = save(noise(8, 8, 1), tmp_path / "a.png")
    copy = tmp_path / "b.png"
    copy.write_bytes(first.read_bytes())
    other = save(noise(8, 8, 2), tmp_path / "c.png")
    assert image_content_hash(first) == image_content_hash(copy)
    assert image_content_hash(first) != image_content_hash(other)
    assert len(image_content_hash(first)) == 64
