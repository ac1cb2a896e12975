"""WebUI install hook: runs at every WebUI start, so it must be fast and install only what is missing.

* Versions are read with ``importlib.metadata`` (no heavy import at start-up).
* The packages the WebUI owns (torch, torchvision, xformers, transformers, gradio, accelerate) are never installed,
  upgraded or downgraded here.
* diffusers is bounded to the releases that import with the host's transformers: diffusers 0.32 and newer need a
  newer transformers than the 4.30.2 that AUTOMATIC1111 v1.10.1 pins.
* A second start with everything in place installs nothing.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTECTED = {"torch", "torchvision", "xformers", "transformers", "gradio", "accelerate"}
# diffusers 0.32+ imports transformers APIs that 4.30 lacks; measured: 0.31 is the newest that imports with 4.30.2.
DIFFUSERS_FOR_OLD_TRANSFORMERS = "<0.32"
OLD_TRANSFORMERS_BELOW = (4, 41)


def version_tuple(text: str) -> tuple[int, ...]:
    """Leading numeric parts of a version: '0.31.0.dev0' -> (0, 31, 0)."""
    parts = []
    for piece in text.split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def read_requirements(path: Path = HERE / "requirements.txt") -> list[tuple[str, str]]:
    """(name, specifier) pairs from requirements.txt, e.g. ('diffusers', '>=0.29.0')."""
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", line)
            pairs.append((match.group(1), match.group(2).replace(" ", "")))
    return pairs


def satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` meets a comma-separated specifier of >=, <, ==, <=, > clauses."""
    have = version_tuple(version)
    for clause in filter(None, specifier.split(",")):
        op, wanted = re.match(r"(>=|<=|==|<|>)(.+)", clause).groups()
        want = version_tuple(wanted)
        ok = {
            ">=": have >= want,
            "<=": have <= want,
            "==": have == want,
            "<": have < want,
            ">": have > want,
        }[op]
        if not ok:
            return False
    return True


def specifier_for(name: str, specifier: str, version_of=installed_version) -> str:
    """The specifier to install ``name`` with on this host."""
    if name == "diffusers":
        transformers = version_of("transformers")
        if transformers and version_tuple(transformers) < OLD_TRANSFORMERS_BELOW:
            return ",".join(filter(None, [specifier, DIFFUSERS_FOR_OLD_TRANSFORMERS]))
    return specifier


def missing_requirements(version_of=installed_version, is_installed=None) -> list[str]:
    """pip requirement strings for what is missing or out of range; empty when all is in place.

    ``is_installed`` is the WebUI's ``launch.is_installed`` when there is one.
    """
    needed = []
    for name, specifier in read_requirements():
        if name.lower() in PROTECTED:
            continue
        wanted = specifier_for(name, specifier, version_of)
        have = version_of(name) if is_installed is None or is_installed(name) else None
        if have is None or not satisfies(have, wanted):
            needed.append(f"{name}{wanted}")
    return needed


def main(launch=None, version_of=installed_version) -> list[str]:
    """Install what is missing through the WebUI's ``launch.run_pip``; returns what was installed."""
    if launch is None:
        import launch  # the WebUI's module; present when the WebUI runs this file
    needed = missing_requirements(version_of, getattr(launch, "is_installed", None))
    for requirement in needed:
        launch.run_pip(f'install "{requirement}"', f"DreamBooth requirement: {requirement}")
    return needed


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # the WebUI must start even if an install fails; the tab reports what is missing
        print(f"[DreamBooth] could not install requirements: {error}", file=sys.stderr)
