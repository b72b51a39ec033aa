"""The image pipeline: the one place where product pictures become tensors, for every image estimator.

:class:`~skproduct.ImageEmbedder` and :class:`~skproduct.FineTuneClassifier`
both go through this package, so a new decoder, augmentation or shard of
work is added here once:

- :mod:`~skproduct.image_pipeline.refs`: ``X`` (a DataFrame, Series or
  sequence) to one list of image references per product, flattened in order.
- :mod:`~skproduct.image_pipeline.data`: the torch ``Dataset`` that decodes and
  preprocesses references under the bad-image policy, the ordered loader, and
  the inference loop that runs a module over every image in batches.
- :mod:`~skproduct.image_pipeline.pooling`: the streaming step that pools
  per-image outputs into per-product ones (mean or max), chunk by chunk, in
  memory bounded by the chunk.
- :mod:`~skproduct.image_pipeline.device`: the one device and precision policy.
- :mod:`~skproduct.image_pipeline.estimator`: the base class of the image
  estimators: shared parameter constraints, tags, the device decided at each
  call, and persistence rules.

Only ``data`` imports torch, and only when a model runs.
"""

from .device import DeviceUnavailableError, resolve_precision
from .estimator import IMAGE_ESTIMATOR_CONSTRAINTS, ImageEstimatorMixin
from .pooling import pool_products
from .refs import flatten_products, image_refs

__all__ = [
    "IMAGE_ESTIMATOR_CONSTRAINTS",
    "DeviceUnavailableError",
    "ImageEstimatorMixin",
    "flatten_products",
    "image_refs",
    "pool_products",
    "resolve_precision",
]
