"""Mirrors ``modules/safe.py`` (v1.10.1): the WebUI's check of pickled ``.ckpt``/``.pt`` files.

Real behaviour reproduced:
- A zip-format file may only contain ``<dir>/data.pkl``, ``<dir>/version``, ``<dir>/byteorder``,
  ``<dir>/.data/serialization_id`` and ``<dir>/data/<N>`` (so current torch's ``.format_version`` and
  ``.storage_alignment`` entries are refused); exactly one ``data.pkl``; its pickle may only name these globals:
  ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2 / _rebuild_parameter /
  _rebuild_device_tensor_from_numpy``, ``torch.{Float,Half,Int,Long,Double,Byte,BFloat16}Storage``, ``torch.float32``,
  ``torch.nn.modules.container.ParameterDict``, ``numpy.core.multiarray.scalar/_reconstruct``, ``numpy.dtype/ndarray``,
  ``_codecs.encode``, ``__builtin__.set`` (and two pytorch_lightning checkpoint classes).
- A non-zip (legacy) file is read as five pickles with the same restrictions.
- ``load()`` returns **None** (after printing a report) instead of raising when the check fails; otherwise it calls
  the original ``torch.load``. Skipped with ``--disable-safe-unpickle``.
Difference: the real module replaces ``torch.load`` for the whole process when imported; the fake only does that
between ``install()`` and ``uninstall()`` (fake only), so importing it cannot change other tests. The fake's
``sd_models.read_state_dict`` calls ``safe.load`` for non-safetensors files, as the real one does through
``torch.load``.
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
from collections.abc import Callable
from typing import Any

import torch

from modules import errors

_ALLOWED_GLOBALS: dict[str, set[str]] = {
    "collections": {"OrderedDict"},
    "torch._utils": {"_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy"},
    "torch": {
        "FloatStorage",
        "HalfStorage",
        "IntStorage",
        "LongStorage",
        "DoubleStorage",
        "ByteStorage",
        "float32",
        "BFloat16Storage",
    },
    "torch.nn.modules.container": {"ParameterDict"},
    "numpy.core.multiarray": {"scalar", "_reconstruct"},
    "numpy": {"dtype", "ndarray"},
    "_codecs": {"encode"},
    "__builtin__": {"set"},
}

allowed_zip_names_re = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
data_pkl_re = re.compile(r"^([^/]+)/data\.pkl$")


def _lightning_stand_in() -> Any:
    """A module with a plain ``ModelCheckpoint`` class: pytorch_lightning is not installed in the tests."""
    import types

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    module.ModelCheckpoint = type("ModelCheckpoint", (), {})
    return module


class RestrictedUnpickler(pickle.Unpickler):
    extra_handler: Callable[[str, str], Any] | None = None

    def persistent_load(self, saved_id: Any) -> Any:
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module: str, name: str) -> Any:
        if self.extra_handler is not None:
            res = self.extra_handler(module, name)
            if res is not None:
                return res
        if module == "pytorch_lightning.callbacks" and name == "model_checkpoint":
            return _lightning_stand_in()  # the real one imports pytorch_lightning, which the WebUI installs
        if module == "pytorch_lightning.callbacks.model_checkpoint" and name == "ModelCheckpoint":
            return _lightning_stand_in().ModelCheckpoint
        if name in _ALLOWED_GLOBALS.get(module, set()):
            if module == "__builtin__":
                return set
            if module == "collections":
                return collections.OrderedDict
            if module == "_codecs":
                import _codecs

                return _codecs.encode
            if module == "numpy.core.multiarray":
                import numpy

                return getattr(numpy.core.multiarray, name)
            import importlib

            return getattr(importlib.import_module(module), name)
        raise Exception(f"global '{module}/{name}' is forbidden")


def check_zip_filenames(filename: Any, names: list[str]) -> None:
    for name in names:
        if allowed_zip_names_re.match(name):
            continue
        raise Exception(f"bad file inside {filename}: {name}")


def check_pt(filename: Any, extra_handler: Callable[[str, str], Any] | None) -> None:
    try:
        with zipfile.ZipFile(filename) as z:
            check_zip_filenames(filename, z.namelist())
            data_pkl_filenames = [f for f in z.namelist() if data_pkl_re.match(f)]
            if len(data_pkl_filenames) == 0:
                raise Exception(f"data.pkl not found in {filename}")
            if len(data_pkl_filenames) > 1:
                raise Exception(f"Multiple data.pkl found in {filename}")
            with z.open(data_pkl_filenames[0]) as file:
                unpickler = RestrictedUnpickler(file)
                unpickler.extra_handler = extra_handler
                unpickler.load()
    except zipfile.BadZipfile:
        with open(filename, "rb") as file:
            unpickler = RestrictedUnpickler(file)
            unpickler.extra_handler = extra_handler
            for _ in range(5):
                unpickler.load()


def load(filename: Any, *args: Any, **kwargs: Any) -> Any:
    return load_with_extra(filename, *args, extra_handler=global_extra_handler, **kwargs)


def load_with_extra(
    filename: Any, extra_handler: Callable[[str, str], Any] | None = None, *args: Any, **kwargs: Any
) -> Any:
    from modules import shared

    try:
        if not shared.cmd_opts.disable_safe_unpickle:
            check_pt(filename, extra_handler)
    except pickle.UnpicklingError:
        errors.report(
            f"Error verifying pickled file from {filename}\n(the file is most likely corrupted)", exc_info=True
        )
        return None
    except Exception:
        errors.report(f"Error verifying pickled file from {filename}\n(the file may be malicious)", exc_info=True)
        return None

    return unsafe_torch_load(filename, *args, **kwargs)


unsafe_torch_load = torch.load
global_extra_handler: Callable[[str, str], Any] | None = None


def install() -> None:
    """Fake only: replace ``torch.load`` process-wide, as importing the real module does."""
    torch.load = load


def uninstall() -> None:
    """Fake only: put the original ``torch.load`` back."""
    torch.load = unsafe_torch_load
