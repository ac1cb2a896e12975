"""Training examples and the order they are seen in.

The sample sequence is a pure function of (seed, global sample index): sample ``g`` belongs to epoch
``g // epoch_length``; within an epoch the concepts take turns (balanced: a small concept's images repeat, reshuffled,
until the largest concept's are used once); with prior preservation each instance sample is paired with a class image
of the same concept.  Batch ``b`` holds samples ``b * batch_size ...``.  Nothing depends on how many steps ran before,
so a resumed run (or several processes, each taking its share of a batch) sees exactly the same samples.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .captions import image_caption, render_prompt
from .images import list_images

if TYPE_CHECKING:
    from ..settings import Concept, Settings


@dataclass(frozen=True)
class Example:
    path: Path
    prompt: str
    concept: int
    is_class: bool


@dataclass(frozen=True)
class Sample:
    """One training sample: an instance example, its paired class example (or None), and its flip."""

    index: int
    instance: Example
    prior: Example | None
    flip: bool


def caption_source(settings: Settings) -> str:
    if settings.use_txt_as_label:
        return "txt"
    if settings.use_filename_as_label:
        return "filename"
    return "prompt"


def _examples(settings: Settings, paths: list[Path], prompt: str, index: int, is_class: bool) -> list[Example]:
    source = caption_source(settings)
    return [
        Example(path, render_prompt(prompt, image_caption(path, source), settings.caption_template), index, is_class)
        for path in paths
    ]


def instance_examples(settings: Settings, index: int, concept: Concept) -> list[Example]:
    return _examples(settings, list_images(concept.instance_data_dir), concept.instance_prompt, index, False)


def class_examples(settings: Settings, index: int, concept: Concept) -> list[Example]:
    """The concept's class images (at most its ``num_class_images``), with the class prompt."""
    from .class_images import usable_class_images

    paths = usable_class_images(concept.class_data_dir, concept.class_prompt)[: settings.class_images_for(concept)]
    return _examples(settings, paths, concept.class_prompt, index, True)


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several parts (stable across runs and processes, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SamplePlan:
    """The deterministic, balanced, infinite sequence of training samples."""

    def __init__(self, instances: list[list[Example]], classes: list[list[Example]] | None, seed: int, hflip: bool):
        self.instances = [group for group in instances if group]
        if not self.instances:
            raise ValueError("no instance images")
        self.classes = classes
        self.seed = seed
        self.hflip = hflip
        self.per_concept = max(len(group) for group in self.instances)
        self.epoch_length = self.per_concept * len(self.instances)
        self._epoch_cache: dict[int, list[tuple[Example, Example | None]]] = {}

    def _epoch(self, epoch: int) -> list[tuple[Example, Example | None]]:
        if epoch not in self._epoch_cache:
            if len(self._epoch_cache) > 2:
                self._epoch_cache.clear()
            rng = random.Random(mix_seed(self.seed, "epoch", epoch))
            columns = []
            for concept_index, group in enumerate(self.instances):
                order: list[Example] = []
                while len(order) < self.per_concept:
                    shuffled = list(group)
                    rng.shuffle(shuffled)
                    order.extend(shuffled)
                order = order[: self.per_concept]
                priors: list[Example | None] = [None] * len(order)
                if self.classes is not None:
                    pool = list(self.classes[concept_index]) if concept_index < len(self.classes) else []
                    if pool:
                        cycled: list[Example] = []
                        while len(cycled) < len(order):
                            shuffled = list(pool)
                            rng.shuffle(shuffled)
                            cycled.extend(shuffled)
                        priors = list(cycled[: len(order)])
                columns.append(list(zip(order, priors)))
            self._epoch_cache[epoch] = [column[i] for i in range(self.per_concept) for column in columns]
        return self._epoch_cache[epoch]

    def sample(self, index: int) -> Sample:
        epoch, position = divmod(index, self.epoch_length)
        instance, prior = self._epoch(epoch)[position]
        flip = self.hflip and random.Random(mix_seed(self.seed, "flip", index)).random() < 0.5
        return Sample(index, instance, prior, flip)

    def batch(self, batch_index: int, batch_size: int) -> list[Sample]:
        return [self.sample(batch_index * batch_size + i) for i in range(batch_size)]

    def epoch_of_batch(self, batch_index: int, batch_size: int) -> int:
        return (batch_index * batch_size) // self.epoch_length
