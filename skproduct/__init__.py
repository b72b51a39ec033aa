"""skproduct: scikit-learn estimators that sort product photos into catalogue categories.

The top level stays light: heavy modules are imported on first use.
"""

from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0.dev0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    "CategoryTree": "skproduct.taxonomy",
    "EmbeddingCache": "skproduct.cache",
    "FineTuneClassifier": "skproduct.finetune",
    "HierarchicalClassifier": "skproduct.heads",
    "TorchLinearClassifier": "skproduct.heads",
    "TreeHeadClassifier": "skproduct.heads",
    "ImageEmbedder": "skproduct.embed",
    "ProductMatcher": "skproduct.matching",
    "BadImagePolicy": "skproduct.images",
    "load_image": "skproduct.images",
    "read_bson": "skproduct.io",
    "read_table": "skproduct.io",
}
_SUBMODULES = (
    "backbones", "cache", "datasets", "demo", "distributed", "embed", "exceptions", "finetune", "heads", "images", "io",
    "matching", "metrics", "runtimes", "taxonomy",
)

__all__ = sorted([*_LAZY, *_SUBMODULES, "__version__"])


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'skproduct' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
