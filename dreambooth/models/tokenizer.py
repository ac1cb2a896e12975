"""The CLIP tokenizer, built offline from the BPE vocabulary that the ``open-clip-torch`` package ships.

SD 1.x and SD 2.x use the same 49,408-token CLIP vocabulary; they differ in the padding token (SD 1.x pads with
``<|endoftext|>``, OpenCLIP in SD 2.x pads with id 0, the token ``!``).  The vocabulary file is read as data: the
``open_clip`` package is located but never imported (it would import torchvision).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import DreamBoothError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # the merges CLIP uses from the file (as in OpenAI's and OpenCLIP's tokenizers)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, on which CLIP's BPE is defined."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def find_bpe_file() -> Path:
    """Path of the BPE vocabulary inside the installed open-clip-torch package."""
    override = os.environ.get("DREAMBOOTH_CLIP_BPE")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / BPE_FILE
        if candidate.is_file():
            return candidate
    raise DreamBoothError(
        "The CLIP vocabulary was not found: it comes from the 'open-clip-torch' package "
        f"(file open_clip/{BPE_FILE}). Install it with 'pip install --no-deps open-clip-torch' "
        "(the WebUI already has it), or set DREAMBOOTH_CLIP_BPE to the file's path."
    )


def vocabulary_files(directory: Path, bpe_file: Path | None = None) -> tuple[Path, Path]:
    """Write transformers' ``vocab.json`` and ``merges.txt`` for CLIP into ``directory``."""
    vocab_text, merges_text = _vocabulary_texts(str(bpe_file or find_bpe_file()))
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab.write_text(vocab_text, encoding="utf-8")
    merges_path.write_text(merges_text, encoding="utf-8")
    return vocab, merges_path


@lru_cache(maxsize=2)
def _vocabulary_texts(bpe_file: str) -> tuple[str, str]:
    """(vocab.json, merges.txt) contents made from the BPE file; made once per process (about 0.2 s)."""
    with gzip.open(bpe_file, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGES + 1]]
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False)
    return vocab, "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"


def clip_tokenizer(family: str = "sd1", max_length: int = 77) -> Any:
    """A transformers ``CLIPTokenizer`` with the real CLIP vocabulary, configured as SD ``family`` uses it.

    Built through ``from_pretrained`` on a local folder, the one constructor that transformers 4 and 5 share.  The
    tokenizer reads its files only while it loads (it saves from memory), so the folder is a temporary one, removed
    as soon as it has loaded, also when loading fails: nothing of ours stays in the system's temp folder.
    """
    from transformers import CLIPTokenizer

    config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS if family == "sd1" else "!",
        "model_max_length": max_length,
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    with tempfile.TemporaryDirectory(prefix=f"dreambooth-clip-{family}-") as temp:
        directory = Path(temp)
        vocabulary_files(directory)
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
