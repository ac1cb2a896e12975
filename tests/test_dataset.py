"""The sample sequence: deterministic from (seed, index), balanced across concepts, class images paired."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from dreambooth.data.dataset import Example, SamplePlan


def examples(concept: int, count: int, is_class: bool = False) -> list[Example]:
    kind = "class" if is_class else "inst"
    return [Example(Path(f"/{kind}{concept}/{i}.png"), f"p{concept}", concept, is_class) for i in range(count)]


def test_concepts_are_balanced_and_every_image_is_used():
    plan = SamplePlan([examples(0, 2), examples(1, 5)], None, seed=1, hflip=False)
    assert plan.epoch_length == 10
    epoch = [plan.sample(i).instance for i in range(plan.epoch_length)]
    assert Counter(e.concept for e in epoch) == {0: 5, 1: 5}
    assert {e.path for e in epoch if e.concept == 1} == {e.path for e in examples(1, 5)}
    assert [e.concept for e in epoch[:4]] == [0, 1, 0, 1]  # the concepts take turns


def test_sequence_depends_only_on_seed_and_index():
    groups = [examples(0, 3), examples(1, 4)]
    a = SamplePlan(groups, None, seed=7, hflip=True)
    b = SamplePlan(groups, None, seed=7, hflip=True)
    forward = [a.sample(i) for i in range(40)]
    backward = [b.sample(i) for i in reversed(range(40))][::-1]  # another access order, another instance
    assert forward == backward
    other = SamplePlan(groups, None, seed=8, hflip=True)
    assert [other.sample(i) for i in range(40)] != forward
    assert a.batch(3, 4) == forward[12:16]


def test_epochs_are_reshuffled():
    plan = SamplePlan([examples(0, 6)], None, seed=3, hflip=False)
    first = [plan.sample(i).instance.path for i in range(6)]
    second = [plan.sample(6 + i).instance.path for i in range(6)]
    assert sorted(first) == sorted(second) and first != second


def test_class_images_are_paired_within_the_concept():
    plan = SamplePlan(
        [examples(0, 2), examples(1, 3)], [examples(0, 4, True), examples(1, 2, True)], seed=0, hflip=False
    )
    for index in range(30):
        sample = plan.sample(index)
        assert sample.prior is not None and sample.prior.is_class
        assert sample.prior.concept == sample.instance.concept


def test_flip_is_drawn_per_sample_only_when_asked():
    groups = [examples(0, 4)]
    assert not any(SamplePlan(groups, None, seed=0, hflip=False).sample(i).flip for i in range(50))
    flips = [SamplePlan(groups, None, seed=0, hflip=True).sample(i).flip for i in range(200)]
    assert 60 < sum(flips) < 140


# ---------------------------------------------------------------------------- captions of class images (issue 12)


def _class_folder(tmp_path: Path) -> Path:
    """A class folder as a run leaves it: two images we generated (prompt saved in the PNG) and one of the user's."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from dreambooth.data.class_images import PROMPT_TAG

    folder = tmp_path / "class"
    folder.mkdir()
    for number in range(2):
        info = PngInfo()
        info.add_text(PROMPT_TAG, "photo of a ring")
        image = Image.new("RGB", (16, 16), (number * 90, 10, 10))
        image.save(folder / f"class-f3e48047-0000{number}.png", pnginfo=info)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "gold_ring_on_velvet.png")
    (folder / "gold_ring_on_velvet.txt").write_text("a gold ring on velvet", encoding="utf-8")
    return folder


def test_generated_class_images_train_with_their_saved_prompt_only(tmp_path):
    from dreambooth.data.dataset import class_examples
    from dreambooth.settings import Concept, Settings

    concept = Concept(class_data_dir=str(_class_folder(tmp_path)), class_prompt="photo of a ring")
    for source in ("use_filename_as_label", "use_txt_as_label"):
        settings = Settings(concepts=[concept], with_prior_preservation=True, **{source: True})
        prompts = {e.path.name: e.prompt for e in class_examples(settings, 0, concept)}
        assert prompts["class-f3e48047-00000.png"] == "photo of a ring", source
        assert prompts["class-f3e48047-00001.png"] == "photo of a ring", source
        # the user's own class image (no saved prompt) is still captioned as the guide says
        expected = "gold ring on velvet" if source == "use_filename_as_label" else "a gold ring on velvet"
        assert prompts["gold_ring_on_velvet.png"] == f"photo of a ring, {expected}", source
