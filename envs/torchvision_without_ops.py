"""Let ``import torchvision`` succeed when its compiled ops cannot load -- installed into ``.venv-ref`` only.

The torchvision 0.28 wheel on this machine's index is the CUDA build; next to the CPU torch its ``_C`` library
cannot load (it links ``libtorch_cuda.so``).  torchvision copes with that everywhere except in
``_meta_registrations``, which registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``
unconditionally and so makes ``import torchvision`` (and transformers' model imports, which import it when it is
installed) fail.  Defining those two operator schemas first, without kernels, lets the import finish; the
transforms -- all that ``train_dreambooth.py`` uses -- need no compiled op.  Nothing is changed when the ops load.

``envs/reference-bench.sh`` copies this file into the environment's site-packages with a ``.pth`` line that
imports it at start-up; it then waits, as an import hook, for the first ``import torchvision``.
"""

from __future__ import annotations

import importlib.abc
import sys
from pathlib import Path

_KEEP = []  # the operator library, kept alive


def allow_torchvision_without_ops() -> None:
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    folder = Path(next(iter(spec.submodule_search_locations)))
    try:
        for library in folder.iterdir():
            if library.name.startswith("_C.") and library.suffix in (".so", ".pyd"):
                torch.ops.load_library(str(library))
        return
    except OSError:
        pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(library)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        """Prepares the first ``import torchvision`` and finds nothing: the regular finders import it."""
        if name == "torchvision":
            sys.meta_path.remove(self)
            allow_torchvision_without_ops()


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
