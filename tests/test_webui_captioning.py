"""Captioning with the WebUI's own interrogators against the fake WebUI v1.10.1 (tests/fake_webui): BLIP
(``shared.interrogator``) and DeepDanbooru (``deepbooru.model``) are called under the queue lock, loaded for the job
only and unloaded after it (also after an error), and write one IMAGE.txt per image."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import draw_subject

from dreambooth.errors import DreamBoothError

pytestmark = pytest.mark.gradio

FAKE = Path(__file__).resolve().parent / "fake_webui"
FAKE_NAMES = ("modules", "launch", "networks")


def _purge_fake() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in FAKE_NAMES:
            del sys.modules[name]


@pytest.fixture
def webui(tmp_path, monkeypatch):
    """A fresh fake WebUI (nothing loaded) and ``dreambooth.webui.captioning`` imported against it."""
    _purge_fake()
    monkeypatch.syspath_prepend(str(FAKE))
    from modules import fake

    fake.reset(tmp_path / "webui")
    import dreambooth.webui.captioning as captioning

    yield captioning
    from modules import call_queue

    assert not call_queue.queue_lock.locked(), "a test left the WebUI's queue lock held"
    _purge_fake()


def calls(prefix=""):
    from modules import fake

    return [call for call in fake.calls if call.name.startswith(prefix)]


def index(name):
    from modules import fake

    return fake.call_names().index(name)


def test_blip_captions_every_image_under_the_queue_lock_and_is_unloaded_after(webui, tmp_path):
    from modules import call_queue, shared

    images = draw_subject(tmp_path / "imgs", count=3)
    report = webui.webui_caption_folder(tmp_path / "imgs", "blip", prefix="ohwx dog")

    assert len(report.written) == 3 and not report.failed
    for path in images:
        assert path.with_suffix(".txt").read_text(encoding="utf-8") == "ohwx dog, a photo of a thing\n"
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == sorted(
        [p.name for p in images] + [p.with_suffix(".txt").name for p in images]
    )
    interrogator_calls = calls("interrogate.")
    assert interrogator_calls and all(call.args["queue_lock_held"] for call in interrogator_calls)
    assert [c.args["location"] for c in calls("blip.generate")] == ["cuda"] * 3  # on the GPU while captioning
    assert all(c.args["queue_lock_held"] for c in calls("blip.generate"))
    names = [c.name for c in interrogator_calls]
    assert names.count("interrogate.load_blip_model") == 1 and names.count("interrogate.generate_caption") == 3
    assert index("queue_lock.acquire") < index("interrogate.load_blip_model")
    assert index("interrogate.load_blip_model") < index("interrogate.generate_caption")
    assert index("interrogate.unload") > max(i for i, c in enumerate(calls()) if c.name == "blip.generate")
    assert index("interrogate.unload") < index("queue_lock.release")
    assert "interrogate.load_clip_model" not in names  # a caption needs BLIP only: CLIP is not loaded or downloaded
    assert shared.interrogator.blip_model.location == "cpu"  # back in RAM after the job
    assert not call_queue.queue_lock.locked()
    assert [c.args["job"] for c in calls("state.begin")] == ["dreambooth-caption"]
    assert shared.state.job == ""


def test_blip_goes_to_the_gpu_for_each_job_and_stays_only_when_the_webui_says_so(webui, tmp_path):
    from modules import shared

    draw_subject(tmp_path, count=1)
    webui.webui_caption_folder(tmp_path, "blip")
    webui.webui_caption_folder(tmp_path, "blip", overwrite=True)
    assert [c.name for c in calls("interrogate.load_blip_model")] == ["interrogate.load_blip_model"]  # reused
    assert [c.args["location"] for c in calls("blip.generate")] == ["cuda", "cuda"]
    assert shared.interrogator.blip_model.location == "cpu"
    shared.opts.interrogate_keep_models_in_memory = True
    webui.webui_caption_folder(tmp_path, "blip", overwrite=True)
    assert shared.interrogator.blip_model.location == "cuda"  # the WebUI's "Keep models in VRAM" is respected


def test_the_model_is_unloaded_and_the_lock_released_after_an_exception(webui, tmp_path):
    from modules import call_queue, shared

    with pytest.raises(RuntimeError, match="boom"), webui.webui_captioner("blip") as captioner:
        assert call_queue.queue_lock.locked()
        assert shared.interrogator.blip_model.location == "cuda"
        raise RuntimeError("boom")
    assert shared.interrogator.blip_model.location == "cpu"
    assert not call_queue.queue_lock.locked()
    assert "interrogate.unload" in [c.name for c in calls()]
    with pytest.raises(DreamBoothError, match="outside"):
        captioner(None)  # the model is unloaded: using the captioner after the block is refused


def test_a_failing_load_still_unloads_and_releases(webui, tmp_path, monkeypatch):
    from modules import call_queue, interrogate

    def broken(self):
        raise OSError("BLIP weights cannot be downloaded")

    monkeypatch.setattr(interrogate.InterrogateModels, "load_blip_model", broken)
    draw_subject(tmp_path, count=1)
    with pytest.raises(OSError, match="cannot be downloaded"):
        webui.webui_caption_folder(tmp_path, "blip")
    assert "interrogate.unload" in [c.name for c in calls()]
    assert not call_queue.queue_lock.locked()
    assert not (tmp_path / "img_0.txt").exists()


def test_deepbooru_tags_are_written_deduplicated_and_without_ranks(webui, tmp_path):
    from modules import deepbooru, shared

    shared.opts.interrogate_return_ranks = True  # ranks belong in the Interrogate box, not in a caption
    deepbooru.fake_scores["SMILE"] = 0.7  # the same tag in another case
    images = draw_subject(tmp_path, count=2)
    report = webui.webui_caption_folder(tmp_path, "deepbooru", prefix="ohwx, solo")

    assert len(report.written) == 2
    for path in images:
        text = path.with_suffix(".txt").read_text(encoding="utf-8")
        assert text == "ohwx, solo, 1girl, SMILE, blue sky, hat \\(object\\)\n"  # sorted as the WebUI does: A-Z first
    booru = calls("deepbooru.")
    assert all(c.args["queue_lock_held"] for c in booru)
    names = [c.name for c in booru]
    assert names[0] == "deepbooru.start" and names[-1] == "deepbooru.stop"
    assert names.count("deepbooru.tag_multi") == 2 and "deepbooru.tag" not in names  # loaded once, not per image
    assert [c.args["location"] for c in calls("deepbooru.tag_multi")] == ["cuda", "cuda"]
    assert all(c.args["force_disable_ranks"] for c in calls("deepbooru.tag_multi"))
    assert deepbooru.model.model.location == "cpu"


def test_deepbooru_is_stopped_after_an_exception(webui, tmp_path):
    from modules import call_queue, deepbooru

    with pytest.raises(ValueError, match="bad"), webui.webui_captioner("deepbooru"):
        assert deepbooru.model.model.location == "cuda"
        raise ValueError("bad")
    assert deepbooru.model.model.location == "cpu"
    assert [c.name for c in calls("deepbooru.")][-1] == "deepbooru.stop"
    assert not call_queue.queue_lock.locked()


def test_nothing_is_loaded_when_every_image_has_its_caption(webui, tmp_path):
    draw_subject(tmp_path, count=2, captions=["mine"])
    report = webui.webui_caption_folder(tmp_path, "blip")
    assert len(report.kept) == 2 and not report.written
    assert calls("interrogate.") == [] and calls("queue_lock.") == []
    assert (tmp_path / "img_0.txt").read_text() == "mine"


def test_the_webuis_interrupt_stops_between_images(webui, tmp_path):
    from modules import shared

    draw_subject(tmp_path, count=3)
    report = webui.webui_caption_folder(tmp_path, "blip", progress=lambda done, total, image: shared.state.interrupt())
    assert report.cancelled and len(report.written) == 1
    assert shared.interrogator.blip_model.location == "cpu"


def test_a_busy_queue_waits_or_refuses(webui, tmp_path):
    from modules import call_queue

    draw_subject(tmp_path, count=1)
    with call_queue.queue_lock, pytest.raises(DreamBoothError, match="busy"):  # e.g. a training job holds it
        webui.webui_caption_folder(tmp_path, "blip", wait=False)
    assert calls("interrogate.") == []
    with pytest.raises(DreamBoothError, match="unknown WebUI captioner"):
        webui.webui_caption_folder(tmp_path, "clip")
    assert not (tmp_path / "img_0.txt").exists()
