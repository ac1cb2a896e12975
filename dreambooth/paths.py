"""What this server may read and write: one rule, used by the tab, the dataset tools, the REST routes and the trainer.

With ``--listen``, ``--share`` or ``--api`` a request can come from another machine and name any path.  Every place
that takes a path from a request asks one :class:`PathPolicy` (made by the host, :attr:`dreambooth.host.Host.paths`):

- **read** (models, VAEs, datasets, prompt files, training states, caption folders): under the read roots, which are
  the allowed roots (``$DREAMBOOTH_ALLOWED_ROOTS``; default: the user's home and the WebUI's or the app's folders)
  plus every write root;
- **write** (checkpoints, runs, class images the trainer generates, prepared datasets, caption files): under the
  write roots only: the checkpoint folder and the extension's own data folder, plus ``$DREAMBOOTH_WRITE_ROOTS``
  (the standalone app: ``--allow-write``).

Paths are compared after resolving ``..`` and symbolic links, so neither can lead outside.  A refusal is one
sentence that names the field, the path, the roots and the setting that changes them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ALLOWED_ROOTS_ENV = "DREAMBOOTH_ALLOWED_ROOTS"
WRITE_ROOTS_ENV = "DREAMBOOTH_WRITE_ROOTS"
READ_HINT = f"set {ALLOWED_ROOTS_ENV} (folders separated by '{os.pathsep}') before starting the server"
WRITE_HINT = f"set {WRITE_ROOTS_ENV} (folders separated by '{os.pathsep}') before starting the server"


def resolved(path: str | os.PathLike) -> Path | None:
    """``path`` absolute with ``~``, ``..`` and links resolved; None when it cannot be a path (a NUL byte, ...)."""
    try:
        return Path(path).expanduser().resolve()
    except (OSError, ValueError, RuntimeError):  # NUL byte, a link loop, an unknown ~user
        return None


def is_within(path: str | os.PathLike, roots: Iterable[Path]) -> bool:
    """Whether ``path`` (resolved, links followed) lies inside one of ``roots`` (or is one)."""
    target = resolved(path)
    if target is None:
        return False
    return any(target == root or root in target.parents for root in roots)


def roots_from_env(name: str) -> list[Path] | None:
    """The folders listed in the environment variable ``name`` (``os.pathsep``-separated); None when unset/empty."""
    configured = os.environ.get(name, "")
    folders = [resolved(p) for p in configured.split(os.pathsep) if p.strip()]
    return [p for p in folders if p is not None] or None


def _unique(paths: Iterable[str | os.PathLike]) -> tuple[Path, ...]:
    seen: list[Path] = []
    for path in paths:
        root = resolved(path)
        if root is not None and root not in seen:
            seen.append(root)
    return tuple(seen)


@dataclass(frozen=True)
class PathPolicy:
    """The folders a request may read from and write to; every writable folder is readable too.

    ``read_hint`` / ``write_hint`` say, as the end of a sentence, how the server's owner allows another folder.
    """

    read_roots: tuple[Path, ...]
    write_roots: tuple[Path, ...]
    read_hint: str = READ_HINT
    write_hint: str = WRITE_HINT

    def __post_init__(self) -> None:
        write = _unique(self.write_roots)
        object.__setattr__(self, "write_roots", write)
        object.__setattr__(self, "read_roots", _unique([*self.read_roots, *write]))

    def may_read(self, path: str | os.PathLike) -> bool:
        return is_within(path, self.read_roots)

    def may_write(self, path: str | os.PathLike) -> bool:
        return is_within(path, self.write_roots)

    def check_read(self, path: str | os.PathLike, field: str) -> str:
        """'' when ``path`` may be read, else the sentence saying why not and what to do."""
        if resolved(path) is None:
            return f"{field}: '{path}' is not a usable path; give an existing file or folder."
        if self.may_read(path):
            return ""
        return (
            f"{field}: '{path}' is outside the folders this server may read ({_listed(self.read_roots)}); "
            f"move it into one of them, or {self.read_hint}."
        )

    def check_write(self, path: str | os.PathLike, field: str, what: str = "") -> str:
        """'' when ``path`` may be written, else the sentence saying why not and what to do.

        ``what``: what would be written there (e.g. "12 class images would be generated there"), for the sentence.
        """
        if resolved(path) is None:
            return f"{field}: '{path}' is not a usable path; give a folder."
        if self.may_write(path):
            return ""
        because = f" ({what})" if what else ""
        return (
            f"{field}: '{path}' is outside the folders this server may write to{because}: "
            f"{_listed(self.write_roots)}; choose a folder inside one of them, or {self.write_hint}."
        )


def _listed(roots: Iterable[Path]) -> str:
    return ", ".join(str(root) for root in roots) or "none"
