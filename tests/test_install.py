"""install.py installs only what is missing, bounds diffusers by the host's transformers, never touches pins."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_installer():
    spec = importlib.util.spec_from_file_location("dreambooth_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeLaunch:
    """The WebUI's ``launch`` module as install.py uses it: is_installed + run_pip."""

    def __init__(self, versions: dict[str, str]):
        self.versions = dict(versions)
        self.pip_calls: list[str] = []

    def is_installed(self, name: str) -> bool:
        return name in self.versions

    def version_of(self, name: str) -> str | None:
        return self.versions.get(name)

    def run_pip(self, command: str, desc: str = "") -> None:
        self.pip_calls.append(command)
        requirement = command.split('"')[1]
        name = requirement.split(">")[0].split("<")[0].split("=")[0]
        self.versions[name] = {"diffusers": "0.31.0", "safetensors": "0.4.2", "PyYAML": "6.0", "lycoris-lora": "4.1.3"}[
            name
        ]


WEBUI_1_10_1 = {
    "torch": "2.1.2",
    "transformers": "4.30.2",
    "gradio": "3.41.2",
    "accelerate": "0.21.0",
    "safetensors": "0.4.2",
    "PyYAML": "6.0",
}
WITH_LYCORIS = {**WEBUI_1_10_1, "lycoris-lora": "4.1.3"}


def test_first_start_installs_exactly_the_missing_one_and_second_start_nothing():
    installer = load_installer()
    launch = FakeLaunch(WEBUI_1_10_1)
    assert installer.main(launch, launch.version_of) == ["diffusers>=0.29.0,<0.32", "lycoris-lora>=4.1.3"]
    assert launch.pip_calls == ['install "diffusers>=0.29.0,<0.32"', 'install "lycoris-lora>=4.1.3"']
    assert installer.main(launch, launch.version_of) == []
    assert len(launch.pip_calls) == 2


def test_diffusers_too_new_for_the_webui_transformers_is_replaced_by_one_that_imports():
    installer = load_installer()
    launch = FakeLaunch({**WITH_LYCORIS, "diffusers": "0.35.1"})
    assert installer.main(launch, launch.version_of) == ["diffusers>=0.29.0,<0.32"]


def test_newer_hosts_keep_their_newer_diffusers():
    installer = load_installer()
    launch = FakeLaunch({**WITH_LYCORIS, "transformers": "4.49.0", "diffusers": "0.35.1"})
    assert installer.main(launch, launch.version_of) == []


def test_pinned_packages_are_never_installed():
    installer = load_installer()
    launch = FakeLaunch({})  # nothing at all installed: still no torch / gradio / transformers / accelerate
    installed = installer.main(launch, launch.version_of)
    names = {r.split(">")[0].split("<")[0].split("=")[0].lower() for r in installed}
    assert names == {"diffusers", "safetensors", "pyyaml", "lycoris-lora"}
    assert not names & installer.PROTECTED


def test_requirements_file_names_no_webui_owned_package():
    installer = load_installer()
    names = {name.lower() for name, _ in installer.read_requirements()}
    assert not names & installer.PROTECTED


def test_installer_is_cheap_to_run():
    """It must not import torch or diffusers to check versions (the WebUI runs it at every start)."""
    import subprocess

    script = (
        "import runpy, sys\n"
        "m = runpy.run_path(sys.argv[1])\n"
        "m['missing_requirements']()\n"
        "print([x for x in ('torch', 'diffusers', 'transformers') if x in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "install.py")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_in_a_complete_environment_nothing_is_installed():
    """Run against this environment's real versions (the 'webui' one pins the WebUI's): nothing to do."""
    installer = load_installer()
    launch = FakeLaunch({})
    launch.is_installed = lambda name: installer.installed_version(name) is not None
    assert installer.main(launch) == []
    assert launch.pip_calls == []
