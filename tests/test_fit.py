"""The fit preset and the "what would fit" list choose the right changes for an estimate (dreambooth/memory/fit.py).

The choosing is tested with a scripted estimate whose every switch saves a known amount, so that the right answer is
known by hand: the estimate itself (a dry run of seconds) is tested in tests/test_estimate.py.  The settings here
are a stand-in with the memory fields of :class:`~dreambooth.settings.Settings` and a scriptable validation, so the
choosing is tested on the full ladder whatever fields this version's settings have.
"""

from __future__ import annotations

import dataclasses

import pytest

from dreambooth.memory import fit
from dreambooth.memory.fit import GIB, Fitter, fit_preset, suggestions

# GiB each switch saves in the scripted estimate (the real ones are of these orders for SD 1.5 at 512 px)
SAVES = {
    "cache_latents": 0.5,
    "mixed_precision": 1.0,
    "optimizer": 4.0,
    "full_bf16": 2.0,
    "fused_backward": 3.0,
    "gradient_checkpointing": 2.5,
    "train_text_encoder": 1.5,
    "train_batch_size": 2.0,
    "resolution": 3.0,
}
BASE_GIB = 20.0


@dataclasses.dataclass
class MemorySettings:
    """The memory fields of the settings, as they are before any switch (the switches' values differ)."""

    cache_latents: bool = False
    mixed_precision: str = "no"
    optimizer: str = "adamw"
    full_bf16: bool = False
    fused_backward: bool = False
    gradient_checkpointing: bool = False
    train_text_encoder: bool = True
    train_batch_size: int = 2
    resolution: int = 512
    device: str = "cpu"
    gradient_accumulation_steps: int = 1
    low_memory: bool = False
    gpu_memory_gb: float = 0.0

    def validate(self, check_files: bool = True) -> list[str]:
        # rules of the kind the settings' validation has for the switches
        problems = []
        if self.fused_backward and self.gradient_accumulation_steps > 1:
            problems.append("fused_backward cannot accumulate gradients: set gradient_accumulation_steps 1")
        if self.full_bf16 and self.mixed_precision != "bf16":
            problems.append("full_bf16 needs mixed_precision bf16")
        return problems


@dataclasses.dataclass
class FakeEstimate:
    peak_bytes: int
    breakdown: dict
    constants: dict
    arch_name: str = "SD 1.x"
    seconds: float = 0.1

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + sum(self.constants.values())


class Scripted:
    """An estimate function: BASE_GIB less what each switch that differs from the base saves; counts its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, settings, arch=None, processes=1):
        base = MemorySettings()
        changed = [name for name in SAVES if getattr(settings, name) != getattr(base, name)]
        self.calls.append(tuple((name, getattr(settings, name)) for name in changed))
        total = BASE_GIB - sum(SAVES[name] for name in changed)
        return FakeEstimate(int((total - 0.5) * GIB), {"weights": int((total - 0.5) * GIB)}, {"cuda": GIB // 2})


def gib(estimate) -> float:
    return estimate.total_bytes / GIB


def test_settings_that_fit_need_no_change_and_one_estimate():
    script = Scripted()
    changes, estimate = fit_preset(MemorySettings(), 21 * GIB, estimate_fn=script)
    assert changes == {} and gib(estimate) == pytest.approx(20.0)
    assert suggestions(MemorySettings(), 21 * GIB, estimate_fn=script) == []
    assert len(script.calls) == 2  # one per call above: nothing else is estimated


def test_the_preset_stops_at_the_first_rung_that_fits():
    script = Scripted()
    changes, estimate = fit_preset(MemorySettings(), int(18.5 * GIB), estimate_fn=script)
    assert changes == {"cache_latents": True, "mixed_precision": "bf16"}  # no-cost switches only
    assert gib(estimate) == pytest.approx(18.5)
    assert len(script.calls) == 3  # base, +cache, +mixed


def test_the_preset_takes_checkpointing_last_and_then_drops_the_small_costs_it_does_not_need():
    script = Scripted()
    changes, estimate = fit_preset(MemorySettings(), 9 * GIB, estimate_fn=script)
    # ladder: 19.5, 18.5, 14.5 (8-bit), 12.5 (bf16 weights), 9.5 (fused), 7.0 (checkpointing) fits; then without
    # fused 10.0 does not fit, without bf16 weights 9.0 fits (dropped), without 8-bit 13.0 does not fit
    assert changes == {
        "cache_latents": True,
        "mixed_precision": "bf16",
        "optimizer": "adamw_8bit",
        "fused_backward": True,
        "gradient_checkpointing": True,
    }
    assert gib(estimate) == pytest.approx(9.0)
    assert len(script.calls) == 1 + 6 + 3
    # what is trained is never changed by the preset
    assert {"train_text_encoder", "train_batch_size", "resolution"}.isdisjoint(changes)


def test_nothing_fits_the_preset_is_every_switch_and_says_so():
    changes, estimate = fit_preset(MemorySettings(), 2 * GIB, estimate_fn=Scripted())
    assert set(changes) == {
        "cache_latents",
        "mixed_precision",
        "optimizer",
        "full_bf16",
        "fused_backward",
        "gradient_checkpointing",
    }
    assert gib(estimate) == pytest.approx(7.0) and estimate.total_bytes > 2 * GIB
    assert changes == Fitter(MemorySettings(), estimate_fn=Scripted()).every_switch()


def test_a_switch_the_settings_refuse_is_left_out():
    refused = MemorySettings(gradient_accumulation_steps=4)
    changes, estimate = fit_preset(refused, 9 * GIB, estimate_fn=Scripted())
    assert "fused_backward" not in changes
    # 19.5, 18.5, 14.5, 12.5, 10.0 (checkpointing): nothing fits 9, every allowed switch is on
    assert gib(estimate) == pytest.approx(10.0)
    assert "fused_backward" not in Fitter(refused, estimate_fn=Scripted()).every_switch()


def test_switches_already_on_are_not_changes():
    settings = MemorySettings(cache_latents=True, mixed_precision="fp16", gradient_checkpointing=True)
    names = [switch.name for switch, _ in Fitter(settings, estimate_fn=Scripted()).switches()]
    assert "cache_latents" not in names and "mixed_precision" not in names
    assert "gradient_checkpointing" not in names


def test_suggestions_are_the_single_changes_that_fit_cheapest_first_each_with_estimate_and_cost():
    found = suggestions(MemorySettings(), int(17.2 * GIB), estimate_fn=Scripted())
    # singles: 19.5, 19.0, 16.0 (8-bit), 18.0, 17.0 (fused), 17.5, 18.5, 18.0, 17.0 (448 px)
    assert [s.changes for s in found] == [{"optimizer": "adamw_8bit"}, {"fused_backward": True}, {"resolution": 448}]
    assert [gib(s.estimate) for s in found] == pytest.approx([16.0, 17.0, 17.0])
    assert "8 bits" in found[0].cost and "per parameter" in found[1].cost and "448 px instead of 512" in found[2].cost


def test_where_no_single_change_fits_the_fit_preset_is_suggested():
    found = suggestions(MemorySettings(), 9 * GIB, estimate_fn=Scripted())
    assert len(found) == 1
    assert found[0].changes == fit_preset(MemorySettings(), 9 * GIB, estimate_fn=Scripted())[0]
    assert "20-30% slower" in found[0].cost and "8 bits" in found[0].cost


def test_where_the_preset_does_not_fit_each_change_of_what_is_trained_on_top_of_it():
    found = suggestions(MemorySettings(), 5 * GIB, estimate_fn=Scripted())
    # every switch: 7.0; + text encoder frozen 5.5, + batch 1 5.0 (fits), + 448 px 4.0 (fits)
    assert [{k: v for k, v in s.changes.items() if k in ("train_batch_size", "resolution")} for s in found] == [
        {"train_batch_size": 1},
        {"resolution": 448},
    ]
    assert [gib(s.estimate) for s in found] == pytest.approx([5.0, 4.0])
    found = suggestions(MemorySettings(), int(1.5 * GIB), estimate_fn=Scripted())
    assert len(found) == 1  # only all three changes of what is trained at once: 7 - 1.5 - 2 - 3 = 0.5
    assert found[0].changes["train_text_encoder"] is False and found[0].changes["resolution"] == 448
    assert gib(found[0].estimate) == pytest.approx(0.5)
    assert suggestions(MemorySettings(), int(0.4 * GIB), estimate_fn=Scripted()) == []


def test_estimates_are_memoised():
    script = Scripted()
    fitter = Fitter(MemorySettings(), estimate_fn=script)
    fitter.suggestions(9 * GIB)
    calls = len(script.calls)
    assert calls == len(set(script.calls))  # no configuration estimated twice
    fitter.fit_preset(9 * GIB)
    assert len(script.calls) == calls  # the preset was part of the list: no new dry run


def test_mixed_precision_is_fp16_on_a_gpu_without_bf16(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert fit._half_precision(MemorySettings(device="auto")) == "fp16"
    assert fit._half_precision(MemorySettings(device="cpu")) == "bf16"


def test_bf16_weights_need_the_rung_of_bf16_mixed_precision_before_them():
    fitter = Fitter(MemorySettings(), estimate_fn=Scripted())
    assert "full_bf16" not in [switch.name for switch, _ in fitter.switches()]  # not a single change on its own
    assert fitter.every_switch()["full_bf16"] is True  # but a rung after mixed precision bf16
    fp16 = Fitter(MemorySettings(mixed_precision="fp16"), estimate_fn=Scripted())
    assert "full_bf16" not in fp16.every_switch()


def test_fused_backward_is_left_out_for_several_processes():
    changes, _ = fit_preset(MemorySettings(), 9 * GIB, estimate_fn=Scripted(), processes=2)
    assert "fused_backward" not in changes
    assert "fused_backward" in Fitter(MemorySettings(), estimate_fn=Scripted()).every_switch()


def test_a_switch_whose_dry_run_fails_is_left_out_and_the_reason_kept():
    """bitsandbytes' 8-bit AdamW cannot run on fake tensors in some versions: the search goes on without it."""
    from dreambooth.errors import DreamBoothError

    script = Scripted()

    def failing(settings, arch=None, processes=1):
        if settings.optimizer == "adamw_8bit":
            raise DreamBoothError("optimizer adamw_8bit: cannot run on fake tensors")
        return script(settings, arch, processes)

    fitter = Fitter(MemorySettings(), estimate_fn=failing)
    changes, estimate = fitter.fit_preset(13 * GIB)
    # 19.5, 18.5, (8-bit fails), 16.5 (bf16 weights), 13.5 (fused), 11.0 (checkpointing) fits; without fused 14.0
    # does not, without bf16 weights 13.0 does
    assert changes == {
        "cache_latents": True,
        "mixed_precision": "bf16",
        "fused_backward": True,
        "gradient_checkpointing": True,
    }
    assert gib(estimate) == pytest.approx(13.0)
    assert (
        "cannot run on fake tensors" in fitter.failures["cache_latents on, mixed_precision bf16, optimizer adamw_8bit"]
    )
    both = Fitter(MemorySettings(), estimate_fn=failing)
    assert [s.changes for s in both.suggestions(17 * GIB)] == [{"fused_backward": True}, {"resolution": 448}]
    assert both.fit_preset(13 * GIB)[0] == changes  # the single and the rung fail alike: said once
    assert list(both.failures) == ["optimizer adamw_8bit"]


def test_at_most_three_single_changes_are_listed():
    found = suggestions(MemorySettings(), int(19.5 * GIB), estimate_fn=Scripted())
    assert [list(s.changes) for s in found] == [["cache_latents"], ["mixed_precision"], ["optimizer"]]


def test_a_search_stops_before_its_next_dry_run_when_told():
    from dreambooth.memory.fit import Superseded

    script = Scripted()
    fitter = Fitter(MemorySettings(), estimate_fn=script, should_stop=lambda: len(script.calls) >= 2)
    with pytest.raises(Superseded):
        fitter.fit_preset(9 * GIB)
    assert len(script.calls) == 2


def test_a_switch_that_blocks_later_rungs_is_tried_without_when_nothing_fits():
    """The estimate could not follow 8-bit AdamW together with bf16 weights or fused backward: the ladder with 8-bit
    ends at 12.0 GiB; without it, bf16 weights, fused backward and checkpointing reach 11.0 GiB, and that is taken."""
    from dreambooth.errors import DreamBoothError

    script = Scripted()

    def partial(settings, arch=None, processes=1):
        if settings.optimizer == "adamw_8bit" and (settings.full_bf16 or settings.fused_backward):
            raise DreamBoothError("the estimate does not cover adamw_8bit with full_bf16 or fused_backward yet")
        return script(settings, arch, processes)

    fitter = Fitter(MemorySettings(), estimate_fn=partial)
    changes, estimate = fitter.fit_preset(10 * GIB)
    assert changes == {
        "cache_latents": True,
        "mixed_precision": "bf16",
        "full_bf16": True,
        "fused_backward": True,
        "gradient_checkpointing": True,
    }
    assert gib(estimate) == pytest.approx(11.0)
    changes, estimate = Fitter(MemorySettings(), estimate_fn=partial).fit_preset(12 * GIB)
    assert gib(estimate) == pytest.approx(12.0) and changes["optimizer"] == "adamw_8bit"  # it fits: no second climb


def test_fit_my_gpu_says_which_switch_the_settings_refuse_and_why():
    """Seen in the real WebUI (no bitsandbytes there): Fit my GPU left 8-bit AdamW out without a word.  A switch the
    settings refuse is logged with the settings' own sentence, whether the GPU's size is known or not."""

    @dataclasses.dataclass
    class NoEightBit(MemorySettings):
        resume_from: str = ""  # apply_low_memory reads it (a resumed run keeps its optimizer)

        def validate(self, check_files: bool = True) -> list[str]:
            problems = super().validate(check_files)
            if self.optimizer == "adamw_8bit":
                problems.append("optimizer adamw_8bit needs the bitsandbytes package, which is not installed")
            return problems

    cpu = type("Device", (), {"type": "cpu", "index": None})()
    for gpu_memory_gb in (0.0, 9.0):  # size not known: every switch; known: the ladder
        lines: list[str] = []
        settings = NoEightBit(low_memory=True, gpu_memory_gb=gpu_memory_gb)
        applied = fit.apply_low_memory(settings, cpu, lines.append, estimate_fn=Scripted())
        assert applied.optimizer == "adamw" and applied.fused_backward
        refused = [line for line in lines if "left out" in line]
        assert refused == [
            "low_memory (fit my GPU): left out optimizer adamw_8bit: optimizer adamw_8bit needs the bitsandbytes "
            "package, which is not installed"
        ], lines
