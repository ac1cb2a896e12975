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

    return DatasetTools(StubCaptionHost(tmp_path / "models", allowed_roots=[tmp_path], write_roots=[tmp_path]))


@pytest.fixture
def read_only_tools(tmp_path):
    """Tools whose host may read tmp_path/home (like a user's home) but write only its own folders (the default)."""
    from dreambooth.ui.tools import DatasetTools

    (tmp_path / "home").mkdir()
    return DatasetTools(StubCaptionHost(tmp_path / "models", allowed_roots=[tmp_path / "home"]))


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


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_the_tools_write_only_under_the_write_roots(read_only_tools, tmp_path):
    """Issue 12 item 13: a folder the server may read is not one it may write: prepare's new folder, the caption
    files and the editor's saves are refused there before anything is written, with the roots and the setting."""
    home, tools = tmp_path / "home", read_only_tools
    draw_subject(home / "raw", count=2, size=(96, 64), captions=["a red ring", "a blue ring"])
    before = _files(home)
    report = tools.prepare(str(home / "raw"), str(home / "ready"), 64, "center", False, "png", "#000000")
    assert "Not prepared" in report and "may write to" in report and "--allow-write" in report
    assert "DREAMBOOTH_WRITE_ROOTS" in report and str(tools.host.data_dir) in report
    report = tools.caption(str(home / "raw"), "stub", "", "ohwx ring", "", True, True)
    assert "Not captioned" in report and "may write to" in report
    _, _, message = tools.load_captions(str(home / "raw"))  # reading is allowed
    assert "2 image(s)" in message
    assert "Not saved" in tools.save(str(home / "raw"), [["img_0.png", "changed"]])
    assert _files(home) == before and not (home / "ready").exists()
    # the extension's own folder is a write root: a prepared copy can go there
    report = tools.prepare(str(home / "raw"), str(tools.host.data_dir / "ready"), 64, "center", False, "png", "")
    assert "Not prepared" not in report and len(list((tools.host.data_dir / "ready").glob("*.png"))) == 2


def test_mask_tool_writes_masks_from_transparency_only_under_the_write_roots(tools, read_only_tools, tmp_path):
    """Dataset tools -> Masks: IMAGE.mask.png from the alpha channel (data/loss_masks.py), a write into the folder."""
    from PIL import Image

    cut_out = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    cut_out.paste((200, 10, 10, 255), (8, 8, 24, 24))
    (tmp_path / "set").mkdir()
    cut_out.save(tmp_path / "set" / "cut.png")
    report = tools.alpha_masks(str(tmp_path / "set"), False)
    assert "1 mask(s) written" in report and (tmp_path / "set" / "cut.mask.png").is_file()
    assert "already have a mask, kept" in tools.alpha_masks(str(tmp_path / "set"), False)
    (tmp_path / "home" / "set").mkdir()
    cut_out.save(tmp_path / "home" / "set" / "cut.png")
    report = read_only_tools.alpha_masks(str(tmp_path / "home" / "set"), True)
    assert "No masks written" in report and "may write to" in report
    assert not (tmp_path / "home" / "set" / "cut.mask.png").exists()


def test_check_images_outside_the_roots_names_the_roots_and_the_setting(tmp_path):
    """Issue 12 item 29: "Check images" on a folder outside the read roots says which folders may be read and
    which setting allows more, in the same sentence the trainer and the tools give."""
    from dreambooth.runner import Runner
    from dreambooth.settings import Concept, Settings
    from dreambooth.ui.tab import build_tab

    host = Host(tmp_path / "models", allowed_roots=[tmp_path / "home"])
    _, tab = build_tab(host, Runner(host))
    outside = Settings(concepts=[Concept(instance_data_dir="/etc", instance_prompt="x")])
    data = {**tab.widget_values(outside), tab.controls["concept_index"]: "1"}  # the form as "Check images" sends it
    answer = tab.check_dataset(data)
    report, thumbnails = answer[tab.controls["dataset_report"]], answer[tab.controls["thumbnails"]]["value"]
    assert thumbnails == []
    for named in (str(tmp_path / "home"), str(host.checkpoint_dir), str(host.data_dir), "--allow", "ALLOWED_ROOTS"):
        assert named in report, named
    assert host.paths.check_read("/etc", "instance_data_dir") in report  # the one sentence of the policy
