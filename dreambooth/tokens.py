"""How the CLIP tokenizer sees an identifier: token count and how common each token is.

The guide asks for a rare identifier ``[V]`` that is one token and means little to the model.  Offline there is no
word list, but CLIP's vocabulary is ordered by BPE merge rank: a token's id minus the 512 byte tokens is the rank of
the merge that made it, and frequent strings are merged first.  So a low id means a common string.  A few tokens
with a well-known meaning despite a high rank (the guide's ``sks``, a rifle) are named explicitly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

BYTE_TOKENS = 512  # 256 byte tokens and 256 end-of-word byte tokens come before the merges
COMMON_RANK = 10_000  # merges ranked below this are everyday words and word pieces
RARE_RANK = 30_000  # merges ranked above this are rare strings
KNOWN_MEANINGS = {
    "sks": "the SKS rifle (the guide's example: samples of 'sks' drift towards guns)",
    "ohwx": "a popular identifier: many shared models already use it",
    "fck": "a swear word's abbreviation",
}
_WORD = re.compile(r"\[[^\]]*\]|[\w'-]+")
_CANDIDATE = re.compile(r"[a-z]{3,5}")


@dataclass(frozen=True)
class WordTokens:
    word: str
    tokens: tuple[str, ...]
    ids: tuple[int, ...]

    @property
    def is_single_token(self) -> bool:
        return len(self.ids) == 1

    @property
    def rank(self) -> int:
        """Merge rank of the (first) token: low = common."""
        return max(0, self.ids[0] - BYTE_TOKENS)

    @property
    def is_everyday_word(self) -> bool:
        """One token from the frequent merges, with no known second meaning: ordinary prompt text ('photo', 'of',
        'ring'), not an identifier."""
        return self.is_single_token and self.rank < COMMON_RANK and self.word.lower() not in KNOWN_MEANINGS

    def warnings(self) -> list[str]:
        found = []
        if not self.is_single_token:
            found.append(f"'{self.word}' becomes {len(self.ids)} tokens ({' + '.join(self.tokens)}): prefer one token")
        elif self.word.lower() in KNOWN_MEANINGS:
            found.append(f"'{self.word}' already means something: {KNOWN_MEANINGS[self.word.lower()]}")
        elif self.rank < COMMON_RANK:
            found.append(
                f"'{self.word}' is a common token (merge rank {self.rank}): the model already knows it; "
                "a rare one is learnt without fighting that meaning"
            )
        return found


@lru_cache(maxsize=1)
def _default_tokenizer() -> Any:
    from .models.tokenizer import clip_tokenizer

    return clip_tokenizer()


def _tokenizer(tokenizer: Any) -> Any:
    return _default_tokenizer() if tokenizer is None else tokenizer


def split_words(phrase: str, tokenizer: Any = None) -> list[WordTokens]:
    """Each word of ``phrase`` with the CLIP tokens it becomes (placeholders like ``[filewords]`` skipped)."""
    tok = _tokenizer(tokenizer)
    words = []
    for word in _WORD.findall(phrase):
        if word.startswith("["):
            continue
        ids = tok(word, add_special_tokens=False).input_ids
        words.append(WordTokens(word, tuple(tok.convert_ids_to_tokens(ids)), tuple(ids)))
    return words


def identifier_words(instance_prompt: str, class_prompt: str = "", tokenizer: Any = None) -> list[WordTokens]:
    """The identifier: the words of the instance prompt that the class prompt lacks, and of those the ones that
    are not everyday CLIP words ("photo of zwx ring" / "ring" -> zwx).  If the words the class prompt lacks are all
    everyday words, they are the identifier ("photo of red dog" / "photo of a dog" -> red, to be warned about).
    With no class prompt, only words that are not everyday words count."""
    class_words = {w.lower() for w in _WORD.findall(class_prompt)}
    lacking = [w for w in split_words(instance_prompt, tokenizer) if w.word.lower() not in class_words]
    unusual = [w for w in lacking if not w.is_everyday_word]
    return unusual or (lacking if class_words else [])


def rare_candidates(count: int = 12, tokenizer: Any = None) -> list[str]:
    """Rare single-token identifiers: whole-word tokens of 3-5 letters from the rarest merges, without a vowel (so
    they read as no English word: ``nlwx``, ``shld``), and none with a known meaning.  Offline there is no
    dictionary: rarity is the BPE merge rank, and a candidate may still be some acronym: check its samples."""
    vocabulary = _tokenizer(tokenizer).get_vocab()
    found = []
    for token, token_id in vocabulary.items():
        word = token.removesuffix("</w>")
        if token == word or not _CANDIDATE.fullmatch(word) or word in KNOWN_MEANINGS:
            continue
        if token_id - BYTE_TOKENS >= RARE_RANK and not any(c in "aeiou" for c in word):
            found.append((-token_id, word))
    return [word for _, word in sorted(found)[:count]]


def identifier_report(instance_prompt: str, class_prompt: str = "", tokenizer: Any = None) -> str:
    """A short text for the tab: the identifier's tokens and any warning."""
    if not instance_prompt.strip():
        return "Type an instance prompt with a rare identifier, e.g. 'photo of ohwx dog'."
    words = identifier_words(instance_prompt, class_prompt, tokenizer)
    if not words and class_prompt.strip():
        return "The instance prompt has no word that the class prompt lacks: add a rare identifier."
    if not words:
        return (
            "The instance prompt has no rare identifier (every word is an everyday one): add one, e.g. "
            + ", ".join(rare_candidates(4, tokenizer))
            + "."
        )
    total = sum(len(w.ids) for w in split_words(instance_prompt, tokenizer))
    lines = [f"{total} CLIP tokens in the prompt (77 at most, 75 usable)."]
    warned = False
    for w in words:
        lines.append(f"- `{w.word}` -> {', '.join(f'{t} ({i})' for t, i in zip(w.tokens, w.ids))}")
        warnings = w.warnings()
        warned = warned or bool(warnings)
        lines.extend(f"  - warning: {text}" for text in warnings)
    if warned:
        lines.append("Rare single-token identifiers to choose from: " + ", ".join(rare_candidates(8, tokenizer)))
    return "\n".join(lines)
