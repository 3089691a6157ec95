"""segment-anything's modeling code, importable without torchvision.

``import segment_anything`` runs the package ``__init__``, which imports the predictor and
the automatic mask generator, and through them torchvision. The network needs only
``segment_anything.modeling`` (plain torch). Where torchvision imports, the ordinary
import is used; where it does not, the package is registered without running its
``__init__`` so that its ``modeling`` sub-package loads on its own.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or RuntimeError when its compiled ops do not match torch
        return False
    return True


def _register_package_without_init() -> None:
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment-anything is not installed: pip install segment-anything (SAM's modeling code)")
    package = types.ModuleType("segment_anything")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    package.__spec__ = spec
    sys.modules["segment_anything"] = package


def load_modeling() -> types.ModuleType:
    """Return ``segment_anything.modeling`` (Sam, ImageEncoderViT, MaskDecoder, ...)."""
    if "segment_anything.modeling" in sys.modules:
        return sys.modules["segment_anything.modeling"]
    if "segment_anything" not in sys.modules and not _torchvision_imports():
        _register_package_without_init()
    return importlib.import_module("segment_anything.modeling")


modeling = load_modeling()
image_encoder = importlib.import_module("segment_anything.modeling.image_encoder")
