"""What makes a configuration fit a GPU: the memory switches, their speed cost, and the search over them.

The switches (:data:`SWITCHES`) are ordered by what they cost: first those that keep what is trained and cost no
speed (cached latents, mixed precision), then those that cost a little (8-bit AdamW, bf16 weights, fused backward),
then gradient checkpointing (about 20-30% slower), and last those that change what is trained (the text encoder
frozen, a smaller batch, a lower resolution).

* :func:`fit_preset`: ``low_memory``'s choice, the fastest combination of the switches that keep what is trained
  that the estimate says fits: a ladder in cost order (each rung adds the next switch) stopped at the first rung
  that fits; when that took gradient checkpointing, the small-cost switches before it are dropped again where the
  estimate says it still fits.
* :func:`suggestions`: when a configuration does not fit, the single changes that make it fit, cheapest first;
  where no single change fits, combinations (the fit preset, then the preset with one change of what is trained).

Each estimate is a dry run of the real training step (:mod:`dreambooth.memory.estimate`, seconds each), so a
:class:`Fitter` memoises them by the changes they estimate and the search asks for as few as it can.  A switch that
the settings' validation refuses (e.g. one another setting rules out) is left out.  No gradio, no torch at import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..settings import Settings
    from .estimate import Estimate

GIB = 2**30
RESOLUTION_STEPS = (1024, 768, 640, 512, 448, 384, 320, 256)  # "a lower resolution": the next of these below
MAX_SUGGESTIONS = 3  # single changes listed at most (the cheapest; each costs a dry run)
MORE_STEPS = 3  # a switch with steps (batch, resolution) tries this many more before giving up
COSTLY = 0.1  # a switch slowing a step by this fraction or more is worth trying to do without


@dataclass(frozen=True)
class Switch:
    """One setting that lowers memory.

    ``value(settings)``: the value that saves memory, or None when the settings have it (or it does not apply).
    ``cost``: its known cost, for people (``{old}`` / ``{new}`` are the values).  ``slowdown``: a rough fraction
    of a step's time it adds, to order the switches.  ``keeps_training``: the same model is trained (the fit preset
    uses only these).
    """

    name: str
    value: Callable[[Settings], Any]
    cost: str
    slowdown: float
    keeps_training: bool = True
    one_process: bool = False  # refused with several processes

    def describe(self, settings: Settings, value: Any) -> str:
        return self.cost.format(old=getattr(settings, self.name), new=value)

    def further(self, settings: Settings, value: Any) -> list[Any]:
        """The next values after ``value`` for a switch with steps (batch, resolution), most modest first, at most
        :data:`MORE_STEPS`; for the others none."""
        values = []
        while len(values) < MORE_STEPS:
            value = self.value(dataclasses.replace(settings, **{self.name: value}))
            if value is None or self.keeps_training:
                break
            values.append(value)
        return values


def _half_precision(settings: Settings) -> str:
    """bf16, except on a CUDA GPU without bf16 (before Ampere), where fp16 is the half precision it has."""
    import torch

    if settings.device != "cpu" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def _lower_resolution(settings: Settings) -> int | None:
    return next((r for r in RESOLUTION_STEPS if r < settings.resolution), None)


def _on(name: str) -> Callable[[Settings], Any]:
    return lambda s: None if getattr(s, name) else True


SWITCHES = (
    Switch(
        "cache_latents",
        _on("cache_latents"),
        "none (faster): the VAE encodes each image once and then leaves the GPU; augmentation draws from "
        "augment_variants fixed variants",
        0.0,
    ),
    Switch(
        "mixed_precision",
        lambda s: _half_precision(s) if s.mixed_precision == "no" else None,
        "none (faster on tensor cores): the forward and backward pass compute in {new}",
        0.0,
    ),
    Switch(
        "optimizer",
        lambda s: "adamw_8bit" if s.optimizer == "adamw" else None,
        "about the same speed: AdamW's states stored in 8 bits (bitsandbytes)",
        0.02,
    ),
    Switch(
        "full_bf16",
        _on("full_bf16"),
        "about the same speed: the weights stored in bf16, each update rounded stochastically",
        0.03,
    ),
    Switch(
        "fused_backward",
        _on("fused_backward"),
        "a few % slower: each parameter is stepped as soon as its gradient is complete; gradient clipping per "
        "parameter instead of by the global norm",
        0.05,
        one_process=True,
    ),
    Switch(
        "gradient_checkpointing",
        _on("gradient_checkpointing"),
        "about 20-30% slower: activations are recomputed in the backward pass",
        0.25,
    ),
    Switch(
        "train_text_encoder",
        lambda s: False if s.train_text_encoder else None,
        "faster, but the text encoder is no longer trained (its embeddings are cached)",
        0.0,
        keeps_training=False,
    ),
    Switch(
        "train_batch_size",
        lambda s: max(1, s.train_batch_size // 2) if s.train_batch_size > 1 else None,
        "{new} instance images per step instead of {old}: noisier steps, more of them for the same epochs",
        0.0,
        keeps_training=False,
    ),
    Switch(
        "resolution",
        _lower_resolution,
        "trained at {new} px instead of {old}: less detail",
        0.0,
        keeps_training=False,
    ),
)


class Superseded(Exception):
    """A search stopped because its answer is no longer wanted (``Fitter.should_stop``)."""


@dataclass(frozen=True)
class Suggestion:
    """Changes (settings field -> value) that make a configuration fit, their estimate and their cost."""

    changes: dict[str, Any]
    estimate: Estimate
    cost: str


def _default_estimate(settings: Settings, arch: Any = None, processes: int = 1) -> Estimate:
    from .estimate import estimate

    return estimate(settings, arch=arch, processes=processes)


class Fitter:
    """Estimates of one configuration with changes applied, memoised; the searches of this module.

    ``estimate_fn(settings, arch=None, processes=1) -> Estimate`` (default: the dry run of
    :mod:`dreambooth.memory.estimate`); ``arch``: passed on (e.g. an ``--arch`` shortcut); ``processes``: the
    data-parallel processes the estimate covers; ``memo``: a dict of estimates to share between fitters (the
    tab keeps one), keyed by the whole settings; ``should_stop``: asked before each dry run, True ends the search
    with :class:`Superseded` (the tab: a newer edit came).
    """

    def __init__(
        self,
        settings: Settings,
        arch: Any = None,
        estimate_fn: Callable[..., Estimate] | None = None,
        processes: int = 1,
        memo: dict[Any, Estimate] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        self.settings = settings
        self.arch = arch
        self.estimate_fn = estimate_fn or _default_estimate
        self.processes = processes
        self.calls = 0  # dry runs made (the memo answers the rest)
        self.failures: dict[str, str] = {}  # changes -> why their dry run failed (the search goes on without them)
        self.refused: dict[str, str] = {}  # a switch left out -> why the settings refuse it (e.g. a missing package)
        self._memo: dict[Any, Estimate] = {} if memo is None else memo
        self.should_stop = should_stop
        self._known_problems = set(settings.validate(check_files=False))

    # ---------------------------------------------------------------------------------------------- pieces

    def switches(self, keeps_training_only: bool = False, alone: bool = True) -> list[tuple[Switch, Any]]:
        """The switches that would change these settings (fields this version has), with their values, in cost
        order.  ``alone``: only those the settings accept on their own (the ladder checks each rung instead: bf16
        weights need mixed precision bf16, the rung before)."""
        names = {f.name for f in dataclasses.fields(self.settings)}
        found = []
        for switch in SWITCHES:
            if switch.name not in names or (keeps_training_only and not switch.keeps_training):
                continue
            value = switch.value(self.settings)
            if value is not None and (not alone or self.usable({switch.name: value})):
                found.append((switch, value))
        return found

    def variant(self, changes: dict[str, Any]) -> Settings:
        return dataclasses.replace(self.settings, **changes)

    def usable(self, changes: dict[str, Any]) -> bool:
        """No problem that the settings without the changes did not have already."""
        return not self._new_problems(changes)

    def _new_problems(self, changes: dict[str, Any]) -> list[str]:
        if self.processes > 1 and any(changes.get(s.name) for s in SWITCHES if s.one_process):
            # validation counts the processes launched, not those this estimate is for
            return [f"{', '.join(s.name for s in SWITCHES if s.one_process)} needs one process"]
        return [p for p in self.variant(changes).validate(check_files=False) if p not in self._known_problems]

    def _refuse(self, switch: Switch, value: Any, trial: dict[str, Any]) -> None:
        """Note why ``switch`` is left out (the settings refuse ``trial``): said to the user, never silent."""
        self.refused.setdefault(changes_text({switch.name: value}), "; ".join(self._new_problems(trial)))

    def estimate(self, changes: dict[str, Any] | None = None) -> Estimate:
        """The estimate of the settings with ``changes`` (a dry run, or the memo's answer)."""
        variant = self.variant(dict(changes or {}))
        key = (repr(variant), repr(self.arch), self.processes, self.estimate_fn)
        if key not in self._memo:
            if self.should_stop is not None and self.should_stop():
                raise Superseded
            self.calls += 1
            self._memo[key] = self.estimate_fn(variant, arch=self.arch, processes=self.processes)
        return self._memo[key]

    def _try(self, changes: dict[str, Any]) -> Estimate | None:
        """The estimate with ``changes``, or None when its dry run fails (the reason goes to :attr:`failures`: a
        switch the estimate cannot follow is left out, not the whole search)."""
        from ..errors import DreamBoothError

        try:
            return self.estimate(changes)
        except Superseded:
            raise
        except Exception as error:  # a dry run the estimate cannot do for this switch: not the search's end
            why = str(error) if isinstance(error, DreamBoothError) else f"{type(error).__name__}: {str(error)[:300]}"
            if why not in self.failures.values():  # the same reason for the next rung says nothing new
                self.failures[changes_text(changes)] = why
            return None

    def _fits(self, changes: dict[str, Any], gpu_bytes: int) -> Estimate | None:
        """The estimate with ``changes`` when it was made and fits ``gpu_bytes``, else None."""
        estimate = self._try(changes)
        return estimate if estimate is not None and estimate.total_bytes <= gpu_bytes else None

    def cost(self, changes: dict[str, Any]) -> str:
        by_name = {s.name: s for s in SWITCHES}
        return "; ".join(by_name[name].describe(self.settings, value) for name, value in changes.items())

    # ---------------------------------------------------------------------------------------------- searches

    def every_switch(self) -> dict[str, Any]:
        """Every switch that keeps what is trained at once (what ``low_memory`` does when the GPU's size is not
        known): the ladder's last rung."""
        changes: dict[str, Any] = {}
        for switch, value in self.switches(keeps_training_only=True, alone=False):
            if self.usable({**changes, switch.name: value}):
                changes[switch.name] = value
            else:
                self._refuse(switch, value, {**changes, switch.name: value})
        return changes

    def fit_preset(self, gpu_bytes: int) -> tuple[dict[str, Any], Estimate]:
        """The fastest combination of the switches that keep what is trained that fits ``gpu_bytes``, and its
        estimate.  Nothing fits: every switch (the least memory there is), whose estimate says by how much not.

        A rung whose dry run fails is skipped (see :attr:`failures`).  When nothing fits and a rung failed only in
        combination with a costed switch taken before (the estimate may not follow 8-bit AdamW with bf16 weights),
        the ladder is climbed once more without that switch, and the better of the two is taken."""
        estimate = self.estimate()
        if estimate.total_bytes <= gpu_bytes:
            return {}, estimate
        blockers: set[str] = set()
        changes, estimate = self._ladder(gpu_bytes, set(), blockers)
        if estimate.total_bytes > gpu_bytes and blockers:
            other, other_estimate = self._ladder(gpu_bytes, blockers, set())
            if other_estimate.total_bytes < estimate.total_bytes:
                changes, estimate = other, other_estimate
        return changes, estimate

    def _ladder(self, gpu_bytes: int, without: set[str], blockers: set[str]) -> tuple[dict[str, Any], Estimate]:
        """Climb the ladder (switches in ``without`` left out) to the first rung that fits, then drop the costed
        switches not needed.  ``blockers`` receives the costed switches taken before a rung whose dry run failed."""
        changes: dict[str, Any] = {}
        estimate, last = self.estimate(), None
        for switch, value in self.switches(keeps_training_only=True, alone=False):
            trial = {**changes, switch.name: value}
            if switch.name in without:
                continue
            if not self.usable(trial):
                self._refuse(switch, value, trial)
                continue
            tried = self._try(trial)
            if tried is None:
                blockers.update(s.name for s in SWITCHES if s.name in changes and s.slowdown > 0)
                continue
            changes, last, estimate = trial, switch, tried
            if tried.total_bytes <= gpu_bytes:
                break
        else:
            return changes, estimate
        if last.slowdown >= COSTLY:  # the cheaper switches taken before may not be needed
            taken = [s for s in SWITCHES if s.name in changes and s is not last and s.slowdown > 0]
            for switch in sorted(taken, key=lambda s: -s.slowdown):
                trial = {k: v for k, v in changes.items() if k != switch.name}
                if self.usable(trial) and (smaller := self._fits(trial, gpu_bytes)) is not None:
                    changes, estimate = trial, smaller
        return changes, estimate

    def suggestions(self, gpu_bytes: int) -> list[Suggestion]:
        """Empty when the settings fit ``gpu_bytes``; else the single changes that fit, cheapest first (at most
        :data:`MAX_SUGGESTIONS`: each is a dry run), or where none does, combinations: the fit preset, else the
        preset with one change of what is trained (each cheapest first), else everything at once when that fits."""
        if self.estimate().total_bytes <= gpu_bytes:
            return []
        found = []
        for switch, value in self.switches():
            if (suggestion := self._first_fit({}, switch, value, gpu_bytes)) is not None:
                found.append(suggestion)
                if len(found) == MAX_SUGGESTIONS:
                    break
        if found:
            return found
        preset, estimate = self.fit_preset(gpu_bytes)
        if estimate.total_bytes <= gpu_bytes:
            return [Suggestion(preset, estimate, self.cost(preset))]
        everything = dict(preset)
        for switch, value in self.switches():
            if switch.keeps_training:
                continue
            if self.usable({**preset, switch.name: value}):
                everything[switch.name] = value
                if (suggestion := self._first_fit(preset, switch, value, gpu_bytes)) is not None:
                    found.append(suggestion)
        if not found and self.usable(everything) and (estimate := self._fits(everything, gpu_bytes)) is not None:
            found.append(Suggestion(everything, estimate, self.cost(everything)))
        return found

    def _first_fit(self, base: dict[str, Any], switch: Switch, value: Any, gpu_bytes: int) -> Suggestion | None:
        """``base`` plus the switch at ``value`` (for batch and resolution: or the next steps) when that fits."""
        for step in [value, *switch.further(self.settings, value)]:
            changes = {**base, switch.name: step}
            if not self.usable(changes):
                break
            if (estimate := self._fits(changes, gpu_bytes)) is not None:
                return Suggestion(changes, estimate, self.cost(changes))
        return None


def suggestions(
    settings: Settings,
    gpu_bytes: int,
    arch: Any = None,
    estimate_fn: Callable[..., Estimate] | None = None,
    processes: int = 1,
) -> list[Suggestion]:
    """When ``settings`` do not fit ``gpu_bytes`` (bytes), the cheapest changes that make them fit; see
    :meth:`Fitter.suggestions`."""
    return Fitter(settings, arch, estimate_fn, processes).suggestions(gpu_bytes)


def fit_preset(
    settings: Settings,
    gpu_bytes: int,
    arch: Any = None,
    estimate_fn: Callable[..., Estimate] | None = None,
    processes: int = 1,
) -> tuple[dict[str, Any], Estimate]:
    """``low_memory``'s choice for a GPU of ``gpu_bytes`` bytes: (changes, their estimate); see
    :meth:`Fitter.fit_preset`."""
    return Fitter(settings, arch, estimate_fn, processes).fit_preset(gpu_bytes)


def gpu_bytes_for(settings: Settings, device: Any = None) -> int | None:
    """The size of the GPU to fit, in bytes: ``gpu_memory_gb`` (GiB, as cards are sold: 8 = an 8 GB card) when set;
    else the CUDA GPU's (``device``, default the first) when there is one; else None (not known)."""
    if settings.gpu_memory_gb > 0:
        return int(settings.gpu_memory_gb * GIB)
    import torch

    if getattr(device, "type", "cuda") != "cuda" or not torch.cuda.is_available():
        return None
    index = getattr(device, "index", None)
    return int(torch.cuda.get_device_properties(index or 0).total_memory)


def changes_text(changes: dict[str, Any]) -> str:
    """``{"gradient_checkpointing": True, "optimizer": "adamw_8bit"}`` -> ``gradient_checkpointing on, optimizer
    adamw_8bit`` (the settings' keys, as config files and ``--set`` write them)."""
    if not changes:
        return "no change"
    shown = {True: "on", False: "off"}
    return ", ".join(f"{k} {shown.get(v, v) if isinstance(v, bool) else v}" for k, v in changes.items())


def apply_low_memory(
    settings: Settings,
    device: Any,
    log: Callable[[str], None],
    processes: int = 1,
    estimate_fn: Callable[..., Estimate] | None = None,
) -> Settings:
    """The settings the trainer runs with: with ``low_memory`` on, the fit preset for the GPU's size applied (every
    switch when the size is not known, or when the estimate cannot be made); each decision goes to ``log``.
    Called before any weights are loaded."""
    if not settings.low_memory:
        return settings
    return _keep_resumed_optimizer(_fit(settings, device, log, processes, estimate_fn), log)


def _keep_resumed_optimizer(settings: Settings, log: Callable[[str], None]) -> Settings:
    """A resumed run keeps the optimizer its state was made with (another GPU size may pick another one, whose
    states could not be read)."""
    if not settings.resume_from:
        return settings
    from ..train.state import find_state, read_state_info

    folder = find_state(settings.resume_from)
    if folder is None:
        return settings  # the trainer says what is wrong with resume_from
    saved = read_state_info(folder).get("optimizer")
    if saved and saved != settings.optimizer:
        log(f"low_memory (fit my GPU): optimizer {saved} kept, as the resumed state was made with it")
        return dataclasses.replace(settings, optimizer=saved)
    return settings


def _fit(
    settings: Settings,
    device: Any,
    log: Callable[[str], None],
    processes: int,
    estimate_fn: Callable[..., Estimate] | None,
) -> Settings:
    fitter = Fitter(settings, estimate_fn=estimate_fn, processes=processes)
    gpu_bytes = gpu_bytes_for(settings, device)
    if gpu_bytes is None:
        changes = fitter.every_switch()
        log(f"low_memory (fit my GPU): the GPU's size is not known, so every memory switch: {changes_text(changes)}")
        _log_refused(fitter, log)
        return dataclasses.replace(settings, **changes)
    log(f"low_memory (fit my GPU): estimating what fits {gpu_bytes / GIB:.1f} GiB (a dry run per switch tried)")
    try:
        changes, estimate = fitter.fit_preset(gpu_bytes)
    except Exception as error:  # the estimate advises; a run does not fail for want of it (the log says why)
        changes = fitter.every_switch()
        log(f"low_memory (fit my GPU): no estimate ({error}), so every memory switch: {changes_text(changes)}")
        _log_refused(fitter, log)
        return dataclasses.replace(settings, **changes)
    from .report import estimate_text

    verdict = "fits" if estimate.total_bytes <= gpu_bytes else "still does not fit"
    log(
        f"low_memory (fit my GPU, {gpu_bytes / GIB:.1f} GiB): {changes_text(changes)}; estimated peak "
        f"{estimate.total_bytes / GIB:.2f} GiB, {verdict} ({estimate_text(estimate)})"
    )
    for tried, why in fitter.failures.items():
        log(f"low_memory (fit my GPU): left out {tried}, the estimate cannot follow it: {why}")
    _log_refused(fitter, log)
    return dataclasses.replace(settings, **changes)


def _log_refused(fitter: Fitter, log: Callable[[str], None]) -> None:
    for switch, why in fitter.refused.items():
        log(f"low_memory (fit my GPU): left out {switch}: {why}")
