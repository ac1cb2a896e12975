"""Training examples and the order they are seen in.

The sample sequence is a pure function of (seed, global sample index): sample ``g`` belongs to epoch
``g // epoch_length``; within an epoch the concepts take turns (balanced: a small concept's images repeat,
reshuffled, until the largest concept's are used once; a concept with ``repeats`` r has each of its images exactly r
times in an epoch, and the balanced concepts are topped up to the longest concept); with prior preservation each
instance sample is paired with a class image of the same concept.  Batch ``b`` holds samples ``b * batch_size ...``.
Nothing depends on how many steps ran before, so a resumed run (or several processes, each taking its share of a
batch) sees exactly the same samples.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def validation_examples(
    settings: Settings, index: int, concept: Concept, examples: list[Example]
) -> tuple[list[Example], list[Example]]:
    """(trained, held out): the concept's instance ``examples`` split for the validation loss.

    A ``validation_data_dir`` holds the concept's held-out images (captioned like its instance images) and every
    instance image trains; otherwise ``validation_split`` of the instance images (rounded, at least one) is held out,
    chosen by their paths inside the folder, not by the seed: runs with other seeds are measured on the same images.
    """
    from ..errors import DreamBoothError

    if concept.validation_data_dir:
        held = list_images(concept.validation_data_dir)
        return examples, _examples(settings, held, concept.instance_prompt, index, False)
    if settings.validation_split <= 0:
        return examples, []
    count = max(1, round(settings.validation_split * len(examples)))
    if count >= len(examples):
        raise DreamBoothError(
            f"concept {index + 1}: validation_split {settings.validation_split} holds out {count} of its "
            f"{len(examples)} instance images and leaves none to train on: lower it, add images, or give the concept "
            "a validation_data_dir"
        )
    root = Path(concept.instance_data_dir)
    ranked = sorted(examples, key=lambda e: mix_seed("validation", e.path.relative_to(root).as_posix()))
    held = set(ranked[:count])
    return [e for e in examples if e not in held], [e for e in examples if e in held]


def class_examples(settings: Settings, index: int, concept: Concept) -> list[Example]:
    """The concept's class images (at most its ``num_class_images``), with the class prompt.

    An image we generated trains with the prompt saved in it and nothing else: its file name and any text file
    beside it are ours, not a caption (with ``use_filename_as_label`` it would train as "photo of a dog, class
    f3e48047").  The user's own class images are captioned like instance images.
    """
    from .class_images import saved_prompt, usable_class_images

    paths = usable_class_images(concept.class_data_dir, concept.class_prompt)[: settings.class_images_for(concept)]
    source = caption_source(settings)
    examples = []
    for path in paths:
        saved = saved_prompt(path)
        if saved is not None:
            prompt = render_prompt(saved, None, settings.caption_template)
        else:
            prompt = render_prompt(concept.class_prompt, image_caption(path, source), settings.caption_template)
        examples.append(Example(path, prompt, index, True))
    return examples


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several parts (stable across runs and processes, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SamplePlan:
    """The deterministic, balanced, infinite sequence of training samples."""

    def __init__(
        self,
        instances: list[list[Example]],
        classes: list[list[Example]] | None,
        seed: int,
        hflip: bool,
        repeats: list[int | None] | None = None,
    ):
        """``repeats``: per concept, how many times each of its images is seen per epoch (None: balanced)."""
        repeats = list(repeats) if repeats is not None else [None] * len(instances)
        kept = [i for i, group in enumerate(instances) if group]
        self.instances = [instances[i] for i in kept]
        if not self.instances:
            raise ValueError("no instance images")
        self.repeats = [repeats[i] for i in kept]
        self.classes = classes
        self.seed = seed
        self.hflip = hflip
        counts = [len(g) * r if r else len(g) for g, r in zip(self.instances, self.repeats)]
        self.per_concept = max(counts)  # a balanced concept's samples per epoch: the longest concept's
        self.lengths = [len(g) * r if r else self.per_concept for g, r in zip(self.instances, self.repeats)]
        self.epoch_length = sum(self.lengths)
        self._epoch_cache: dict[int, list[tuple[Example, Example | None]]] = {}

    def _epoch(self, epoch: int) -> list[tuple[Example, Example | None]]:
        if epoch not in self._epoch_cache:
            if len(self._epoch_cache) > 2:
                self._epoch_cache.clear()
            rng = random.Random(mix_seed(self.seed, "epoch", epoch))
            columns = []
            for concept_index, group in enumerate(self.instances):
                order: list[Example] = []
                while len(order) < self.lengths[concept_index]:  # whole shuffles: with repeats r, each image r times
                    shuffled = list(group)
                    rng.shuffle(shuffled)
                    order.extend(shuffled)
                order = order[: self.lengths[concept_index]]
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
            # The concepts take turns; a shorter concept (its own repeats) drops out when its samples are used.
            longest = max(len(column) for column in columns)
            self._epoch_cache[epoch] = [column[i] for i in range(longest) for column in columns if i < len(column)]
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

    def batches_per_epoch(self, batch_size: int) -> Fraction:
        """Batches in an epoch (a fraction: batches run on across epoch ends)."""
        return Fraction(self.epoch_length, batch_size)


class BucketPlan(SamplePlan):
    """Aspect-ratio bucketing: batches never mix buckets.

    Each epoch's samples (balanced and paired exactly as in :class:`SamplePlan`) are grouped by the bucket of their
    instance image, cut into batches of ``batch_size`` (a bucket's last batch may be smaller), and the batches are
    shuffled from (seed, epoch).  A sample keeps the index of its place in the epoch, so its noise, timestep and flip
    do not depend on the grouping.  A class image brings its own bucket: the loss runs it in its own forward pass
    when its shape differs, and the instance / prior split stays by mask.
    """

    def __init__(
        self,
        instances: list[list[Example]],
        classes: list[list[Example]] | None,
        seed: int,
        hflip: bool,
        bucket_of: dict[Path, Any],
        batch_size: int,
        repeats: list[int | None] | None = None,
    ):
        super().__init__(instances, classes, seed, hflip, repeats)
        self.bucket_of = bucket_of
        self.batch_size = batch_size
        self._starts = [0]  # first batch index of each epoch computed so far
        self._batches: dict[int, list[list[int]]] = {}

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._batches:
            if len(self._batches) > 2:
                self._batches.clear()
            groups: dict[Any, list[int]] = {}
            for position, (instance, _) in enumerate(self._epoch(epoch)):
                groups.setdefault(self.bucket_of[instance.path], []).append(position)
            size = self.batch_size
            batches = [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]
            random.Random(mix_seed(self.seed, "batches", epoch)).shuffle(batches)
            self._batches[epoch] = batches
        return self._batches[epoch]

    def _locate(self, batch_index: int) -> tuple[int, int]:
        while self._starts[-1] <= batch_index:
            epoch = len(self._starts) - 1
            self._starts.append(self._starts[-1] + len(self._epoch_batches(epoch)))
        epoch = bisect.bisect_right(self._starts, batch_index) - 1
        return epoch, batch_index - self._starts[epoch]

    def batch(self, batch_index: int, batch_size: int) -> list[Sample]:
        if batch_size != self.batch_size:
            raise ValueError(f"this plan was made for batches of {self.batch_size}, not {batch_size}")
        epoch, position = self._locate(batch_index)
        return [self.sample(epoch * self.epoch_length + p) for p in self._epoch_batches(epoch)[position]]

    def epoch_of_batch(self, batch_index: int, batch_size: int) -> int:
        return self._locate(batch_index)[0]

    def batches_per_epoch(self, batch_size: int) -> Fraction:
        return Fraction(len(self._epoch_batches(0)))
