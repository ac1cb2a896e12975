"""The tab's Dataset tools: prepare, captioning and the caption editor, through their handlers."""

from __future__ import annotations

import contextlib

import pytest
from conftest import draw_subject

from dreambooth.host import Host

pytestmark = pytest.mark.gradio


class StubCaptionHost(Host):
    def captioner_names(self):
        return ["stub", *super().captioner_names()]

    @contextlib.contextmanager
    def captioner(self, name, model=""):
        if name != "stub":
            with super().captioner(name, model) as captioner:
                yield captioner
            return
        yield lambda image: f"a picture {image.size[0]} wide"


@pytest.fixture
def tools(tmp_path):
    from dreambooth.ui.tools import DatasetTools

    return DatasetTools(StubCaptionHost(tmp_path / "models", allowed_roots=[tmp_path]))


def test_prepare_writes_a_new_folder_and_refuses_outside_paths(tools, tmp_path):
    draw_subject(tmp_path / "raw", count=2, size=(96, 64))
    report = tools.prepare(str(tmp_path / "raw"), str(tmp_path / "ready"), 64, "center", False, "png", "#000000")
    assert "2" in report and len(list((tmp_path / "ready").glob("*.png"))) == 2
    focal = tmp_path / "focal.json"
    focal.write_text('{"img_0.png": [0.9, 0.5], "img_1.png": [0.1, 0.5]}')
    report = tools.prepare(str(tmp_path / "raw"), str(tmp_path / "f"), 64, "focal", False, "png", "", str(focal))
    assert "Not prepared" not in report and len(list((tmp_path / "f").glob("*.png"))) == 2
    assert "outside the folders" in tools.prepare("/etc", str(tmp_path / "x"), 64, "center", False, "png", "#fff")
    assert "outside the folders" in tools.prepare(
        str(tmp_path / "raw"), "/tmp/../etc/x", 64, "center", False, "png", ""
    )


def test_caption_tool_writes_one_txt_per_image(tools, tmp_path):
    draw_subject(tmp_path / "set", count=3, size=(80, 64))
    report = tools.caption(str(tmp_path / "set"), "stub", "", "ohwx ring", "", False, True)
    assert "3" in report
    captions = sorted(p.read_text().strip() for p in (tmp_path / "set").glob("*.txt"))
    assert captions == ["ohwx ring, a picture 80 wide"] * 3
    assert "Not captioned" in tools.caption(
        str(tmp_path / "set"), "BLIP (local model)", str(tmp_path / "none"), "", "", False, True
    )


def test_caption_editor_loads_replaces_and_saves(tools, tmp_path):
    folder = tmp_path / "edit"
    draw_subject(folder, count=2, captions=["a red ring on grass", "a red ring on sand"])
    table, gallery, message = tools.load_captions(str(folder))
    assert [row[1] for row in table] == ["a red ring on grass", "a red ring on sand"] and len(gallery) == 2
    table, message = tools.replace(table, "red", "crimson")
    assert "2 caption(s) changed" in message and table[0][1] == "a crimson ring on grass"
    assert (folder / "img_0.txt").read_text() == "a red ring on grass"  # nothing saved yet
    assert "Saved 2" in tools.save(str(folder), table)
    assert (folder / "img_1.txt").read_text() == "a crimson ring on sand"
    assert "Saved 0" in tools.save(str(folder), table)  # unchanged captions are not rewritten
    assert "not inside" in tools.save(str(folder), [["../escape.png", "x"]])
    assert "outside the folders" in tools.load_captions("/etc")[2]
