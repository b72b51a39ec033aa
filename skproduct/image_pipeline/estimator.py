"""The base of the image estimators: shared parameters, tags, the device decided at each call, persistence.

:class:`ImageEstimatorMixin` is to :class:`~skproduct.ImageEmbedder` and
:class:`~skproduct.FineTuneClassifier` what scikit-learn's ``BaseSGD`` is to
its SGD estimators: the parameters both take are constrained once
(:data:`IMAGE_ESTIMATOR_CONSTRAINTS`, merged into each estimator's own
``_parameter_constraints``), and the rules both follow are written once.
"""

from __future__ import annotations

import os
from numbers import Integral

from sklearn.utils._param_validation import Interval, StrOptions

from .._compat import VersionStampMixin
from ..images import ON_ERROR_CHOICES
from .refs import image_refs

__all__ = ["IMAGE_ESTIMATOR_CONSTRAINTS", "ImageEstimatorMixin"]

#: The parameters every estimator that runs a backbone on images shares.
IMAGE_ESTIMATOR_CONSTRAINTS: dict = {
    "backbone": [str],
    "pretrained": ["boolean"],
    "weights": [str, os.PathLike, None],
    "device": [str],
    "num_workers": [Interval(Integral, 0, None, closed="left")],
    "precision": [StrOptions({"auto", "fp32", "bf16", "fp16"})],
    "image_size": [Interval(Integral, 8, None, closed="left"), None],
    "pooling": [StrOptions({"mean", "max"})],
    "column": [str, None],
    "on_error": [StrOptions(set(ON_ERROR_CHOICES))],
    "verbose": ["verbose"],
    "random_state": [Interval(Integral, 0, None, closed="left")],
}


class ImageEstimatorMixin(VersionStampMixin):
    """What the image estimators share: ``X`` read as images, the device and precision policy, tags.

    The device is decided at every call, from the ``device`` parameter as it
    is then (see :mod:`skproduct.image_pipeline.device`): ``set_params(device=...)``
    on a fitted estimator takes effect at its next call, without refitting.
    ``device_`` and ``precision_`` record the fit's; ``precision_`` is kept by
    later calls wherever their device can run it.
    """

    def _products(self, X) -> list[list]:
        return image_refs(X, self.column)

    def _fit_device(self):
        """Resolve ``device_`` and ``precision_`` for a fit; the device is the call's."""
        from .device import resolve_precision

        device = self._call_device_only()
        self.device_, self.precision_ = str(device), resolve_precision(self.precision, device)
        return device

    def _call_device_only(self):
        from .device import resolve_device

        inherited = self.device == getattr(self, "_inherited_device", None)
        return resolve_device(self.device, inherited=inherited)

    def _call_device(self):
        """``(torch device, precision)`` of this call: the device from the current parameter, the fit's precision
        where that device runs it."""
        from .device import precision_for_call

        device = self._call_device_only()
        return device, precision_for_call(self.precision_, device)

    def set_params(self, **params):
        if "device" in params:  # asked for now: a missing device is an error, not a fallback
            self.__dict__.pop("_inherited_device", None)
        return super().set_params(**params)

    def __setstate__(self, state):
        super().__setstate__(state)
        # The device parameter came with the file: if this machine lacks it, calls fall back to the CPU with a
        # warning instead of failing.
        self._inherited_device = self.__dict__.get("device")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.non_deterministic = False
        return tags

    @property
    def _n_features_out(self) -> int:
        return self.n_features_out_
