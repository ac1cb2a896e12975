"""The identifier advisor with the real CLIP vocabulary (from open-clip-torch's BPE file)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dreambooth.tokens import identifier_report, identifier_words, rare_candidates, split_words

ROOT = Path(__file__).resolve().parents[1]


def test_token_counts_of_known_words():
    counts = {w.word: len(w.ids) for w in split_words("sks dog photo zwx xyzzyqqplorb")}
    assert counts["sks"] == 1 and counts["dog"] == 1 and counts["photo"] == 1
    assert counts["zwx"] == 2 and counts["xyzzyqqplorb"] >= 3


def test_the_identifier_is_what_the_class_prompt_lacks():
    assert [w.word for w in identifier_words("a photo of olis dog", "a photo of a dog")] == ["olis"]
    assert [w.word for w in identifier_words("[filewords] olis style")] == ["olis"]


def test_only_the_identifier_gets_warnings_not_the_ordinary_words_around_it():
    """Item 25: "photo of zwx ring" flagged "photo", "of" and "ring" too."""
    for class_prompt in ("", "ring", "photo of a ring"):
        report = identifier_report("photo of zwx ring", class_prompt)
        warned = [line for line in report.splitlines() if "warning" in line]
        assert warned and all("'zwx'" in line for line in warned), (class_prompt, report)
        assert [w.word for w in identifier_words("photo of zwx ring", class_prompt)] == ["zwx"]
    # no class prompt: the identifier is what is not an everyday CLIP word, whatever its place
    assert [w.word for w in identifier_words("sks ring in a photo")] == ["sks"]
    assert [w.word for w in identifier_words("a photo of a red ring")] == []
    assert "no rare identifier" in identifier_report("a photo of a red ring")
    # a class prompt names the identifier even when it is an everyday word: then that word is warned about
    [red] = identifier_words("photo of red ring", "photo of a ring")
    assert "common token" in red.warnings()[0]


def test_warnings_for_poor_identifiers():
    [sks] = identifier_words("photo of sks dog", "photo of a dog")
    assert sks.is_single_token and "rifle" in " ".join(sks.warnings())
    [multi] = identifier_words("photo of zwx dog", "photo of a dog")
    assert "becomes 2 tokens" in multi.warnings()[0]
    [common] = identifier_words("photo of red dog", "photo of a dog")
    assert "common token" in common.warnings()[0]
    [rare] = identifier_words("photo of olis dog", "photo of a dog")
    assert rare.warnings() == []


def test_rare_candidates_are_single_rare_tokens_without_a_known_meaning():
    candidates = rare_candidates(10)
    assert len(candidates) == 10 and len(set(candidates)) == 10
    for word in candidates:
        [tokens] = split_words(word)
        assert tokens.is_single_token and tokens.rank >= 30_000 and tokens.warnings() == []
    assert "sks" not in candidates and "ohwx" not in candidates


def test_report_suggests_candidates_only_when_something_is_wrong():
    assert "Rare single-token identifiers" in identifier_report("photo of sks dog", "photo of a dog")
    assert "Rare single-token" not in identifier_report("photo of olis dog", "photo of a dog")
    assert "rare identifier" in identifier_report("", "")


def test_tokens_command():
    result = subprocess.run(
        [sys.executable, "-m", "dreambooth", "tokens", "photo of sks dog", "--class-prompt", "photo of a dog"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "sks</w> (48136)" in result.stdout and "rifle" in result.stdout
