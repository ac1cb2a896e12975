"""A ``.ckpt`` we write passes the rules of AUTOMATIC1111 v1.10.1's safe unpickler (``modules/safe.py``).

The rules are restated here: in a zip, only ``data.pkl``, ``version`` and ``data/N`` entries; otherwise the legacy
format, whose five pickles are read; in both, only the globals the WebUI allows may be named.
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile

import pytest
import torch

from dreambooth.models.components import load_components, save_single_file

ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("_codecs", "encode"),
    ("pytorch_lightning.callbacks", "model_checkpoint"),
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("__builtin__", "set"),
} | {
    ("torch", name)
    for name in (
        "FloatStorage",
        "HalfStorage",
        "IntStorage",
        "LongStorage",
        "DoubleStorage",
        "ByteStorage",
        "float32",
        "BFloat16Storage",
    )
}
ALLOWED_ZIP_NAMES = re.compile(r"^[^/]+/((data/\d+)|version|(data\.pkl))$")


class WebuiRestrictedUnpickler(pickle.Unpickler):
    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        if module == "collections":
            return collections.OrderedDict
        return super().find_class(module, name)


def check_like_the_webui(path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                assert ALLOWED_ZIP_NAMES.match(name), f"bad file inside checkpoint: {name}"
            data = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            with archive.open(data[0]) as handle:
                WebuiRestrictedUnpickler(handle).load()
    except zipfile.BadZipFile:
        with open(path, "rb") as handle:
            unpickler = WebuiRestrictedUnpickler(handle)
            for _ in range(5):
                unpickler.load()


@pytest.mark.parametrize("half", [False, True])
def test_our_ckpt_passes_the_webui_rules(tiny_checkpoint, tmp_path, half):
    components = load_components(tiny_checkpoint("sd1"))
    path = save_single_file(components, tmp_path / "model.ckpt", half=half)[0]
    check_like_the_webui(path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert loaded["model.diffusion_model.out.2.weight"].dtype == (torch.float16 if half else torch.float32)


def test_the_rules_reject_what_the_webui_rejects(tmp_path):
    """The check is real: torch's current zip format (with .format_version etc.) and foreign globals fail."""
    modern = tmp_path / "modern.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, modern)
    with pytest.raises(AssertionError, match="bad file inside checkpoint"):
        check_like_the_webui(modern)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": print}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(pickle.UnpicklingError, match="forbidden"):
        check_like_the_webui(evil)
