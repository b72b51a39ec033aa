"""ImageEmbedder: a scikit-learn transformer from product pictures to backbone embeddings."""

from __future__ import annotations

import logging
import os
from numbers import Integral

import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
)
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .backbones import (
    build_backbone,
    fingerprint,
    parse_backbone,
    resolve_preprocessing,
    weights_identity,
)
from .cache import EmbeddingCache
from .images import ON_ERROR_CHOICES, picture_content

logger = logging.getLogger(__name__)

__all__ = ["ImageEmbedder", "flatten_products", "image_refs"]

_IMAGE_COLUMNS = ("images", "image")
_FLUSH_EVERY = 2048


def image_refs(X, column: str | None = None) -> list[list]:
    """Per product, the list of its picture references.

    ``X`` is a DataFrame (from :func:`~skproduct.io.read_bson` or
    :func:`~skproduct.io.read_table`), a Series, or a sequence whose items are
    picture references or lists of them. For a DataFrame, ``column`` names the
    picture column; by default ``"images"`` or else ``"image"``.

    Examples
    --------
    >>> image_refs(["a.jpg", ["b.jpg", "c.jpg"]])
    [['a.jpg'], ['b.jpg', 'c.jpg']]
    """
    import pandas as pd

    if isinstance(X, pd.DataFrame):
        if column is None:
            column = next((c for c in _IMAGE_COLUMNS if c in X.columns), None)
            if column is None:
                raise ValueError(
                    f"the DataFrame has no 'images' or 'image' column (columns: {list(X.columns)}); pass column="
                )
        elif column not in X.columns:
            raise ValueError(f"the DataFrame has no column {column!r} (columns: {list(X.columns)})")
        X = X[column]
    if isinstance(X, (str, bytes, os.PathLike)) or not hasattr(X, "__len__"):
        raise TypeError(
            f"X must be a DataFrame, a Series or a sequence of picture references, got {type(X).__name__}"
        )
    if isinstance(X, np.ndarray) and X.dtype != object:
        raise TypeError(
            "X is a numeric array; skproduct's image estimators take picture references (paths, bytes, PIL "
            "images, uint8 arrays, BsonImageRef), one item (or list of items) per product"
        )
    products = []
    for position, item in enumerate(X):
        refs = list(item) if isinstance(item, (list, tuple)) else [item]
        if not refs:
            raise ValueError(f"product {position} has no pictures")
        products.append(refs)
    return products


# The parameters every estimator that runs a backbone on pictures shares (ImageEmbedder, FineTuneClassifier).
PICTURE_ESTIMATOR_CONSTRAINTS: dict = {
    "backbone": [str],
    "pretrained": ["boolean"],
    "weights": [str, os.PathLike, None],
    "device": [str],
    "num_workers": [Interval(Integral, 0, None, closed="left")],
    "precision": [StrOptions({"auto", "fp32", "bf16", "fp16"})],
    "image_size": [Interval(Integral, 8, None, closed="left"), None],
    "column": [str, None],
    "on_error": [StrOptions(set(ON_ERROR_CHOICES))],
    "verbose": ["verbose"],
    "random_state": [Interval(Integral, 0, None, closed="left")],
}


def flatten_products(products: list[list]) -> tuple[list, np.ndarray]:
    """Every picture of ``products`` in order, and the position of the product each belongs to.

    Examples
    --------
    >>> refs, owner = flatten_products([["a.jpg"], ["b.jpg", "c.jpg"]])
    >>> refs, owner.tolist()
    (['a.jpg', 'b.jpg', 'c.jpg'], [0, 1, 1])
    """
    refs = [ref for product in products for ref in product]
    return refs, np.repeat(np.arange(len(products)), [len(product) for product in products])


class ImageEmbedder(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Turn each product's pictures into one vector with a pretrained backbone.

    Pictures of all products are flattened into batches, decoded and
    preprocessed (in DataLoader workers when ``num_workers > 0``), run through
    the backbone in ``eval()`` mode under ``torch.inference_mode()`` with
    channels-last memory, and pooled per product. Large JPEGs are decoded at a
    reduced scale that still covers the network's input (several times faster
    than a full decode and resize). With a ``cache``, every picture's vector is stored
    under ``(backbone fingerprint, picture content)``: cross-validation folds,
    grid-search candidates and later ``predict`` calls never extract a picture
    twice, and a transform whose pictures are all cached neither builds the
    model nor decodes a picture.

    Parameters
    ----------
    backbone : str, default="timm:resnet50"
        ``"timm:<model>"`` (pooled pre-classifier features of any timm model)
        or ``"open_clip:<model>/<pretrained tag>"`` (the CLIP image tower).
    pretrained : bool, default=True
        Download pretrained weights as timm or open_clip do. Offline this fails
        with an error that says how to pass ``weights``. With ``False`` the
        weights are random, seeded by ``random_state``.
    weights : str or path-like, optional
        A local weights file (a state dict, or open_clip's checkpoint); wins
        over ``pretrained``.
    device : str, default="auto"
        ``"auto"`` picks CUDA, then MPS, then the CPU; or a torch device string.
    batch_size : int, default=64
        Pictures per forward pass.
    num_workers : int, default=0
        DataLoader worker processes that decode and preprocess pictures.
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        ``"auto"``: bf16 (or fp16) autocast on CUDA, fp32 elsewhere.
    image_size : int, optional
        Input side in pixels; defaults to the backbone's own.
    pooling : {"mean", "max"}, default="mean"
        How a product's pictures are combined.
    column : str, optional
        The DataFrame column holding the pictures (default ``"images"``, then ``"image"``).
    cache : str, path-like or EmbeddingCache, optional
        Where vectors are kept; ``None`` keeps none.
    on_error : {"raise", "skip", "blank"}, default="raise"
        The policy for pictures that do not decode
        (:class:`~skproduct.images.BadImagePolicy`). A product whose pictures
        were all skipped gets a zero vector, with a warning.
    verbose : int, default=0
        ``> 0`` shows a progress bar during extraction.
    random_state : int, default=0
        Seed of the random weights when ``pretrained=False``, so that clones
        share their weights and their fingerprint.

    Attributes
    ----------
    fingerprint_ : str
        The cache key of this backbone, weights, preprocessing and precision.
    preprocessing_ : Preprocessing
        Resize, crop and normalisation used.
    device_ : str
        The device the model runs on.
    precision_ : str
        The precision used (``"fp32"``, ``"bf16"`` or ``"fp16"``).
    n_features_out_ : int
        The embedding size.

    Examples
    --------
    >>> import numpy as np
    >>> pictures = [np.full((32, 32, 3), v, dtype=np.uint8) for v in (0, 128, 255)]
    >>> embedder = ImageEmbedder("timm:test_resnet", pretrained=False, image_size=32)
    >>> embedder.fit_transform(pictures).shape
    (3, 96)
    """

    _parameter_constraints: dict = {
        **PICTURE_ESTIMATOR_CONSTRAINTS,
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "pooling": [StrOptions({"mean", "max"})],
        "cache": [str, os.PathLike, EmbeddingCache, None],
    }

    def __init__(
        self,
        backbone: str = "timm:resnet50",
        *,
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
        device: str = "auto",
        batch_size: int = 64,
        num_workers: int = 0,
        precision: str = "auto",
        image_size: int | None = None,
        pooling: str = "mean",
        column: str | None = None,
        cache: str | os.PathLike | EmbeddingCache | None = None,
        on_error: str = "raise",
        verbose: int = 0,
        random_state: int = 0,
    ):
        self.backbone = backbone
        self.pretrained = pretrained
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.precision = precision
        self.image_size = image_size
        self.pooling = pooling
        self.column = column
        self.cache = cache
        self.on_error = on_error
        self.verbose = verbose
        self.random_state = random_state

    # -- scikit-learn protocol -------------------------------------------------
    def fit(self, X=None, y=None):
        """Resolve the backbone, its preprocessing, device, precision and fingerprint.

        Nothing is learned from ``X``: the backbone is pretrained (or seeded).
        The model itself is built on first use, and not at all when every
        picture is cached.
        """
        self._validate_params()
        from ._torch_data import resolve_device, resolve_precision

        spec = parse_backbone(self.backbone)
        device = resolve_device(self.device)
        self.device_ = str(device)
        self.precision_ = resolve_precision(self.precision, device)
        self.preprocessing_ = resolve_preprocessing(spec, self.image_size)
        weights = None if self.weights is None else os.fspath(self.weights)
        self._weights_id = weights_identity(spec, self.pretrained, weights, self.random_state)
        self.fingerprint_ = fingerprint(spec, self._weights_id, self.preprocessing_, self.precision_)
        self._module = None
        if getattr(self, "_restored_for", None) != (self.backbone, self._weights_id, self.image_size):
            self._state_to_restore = None  # weights from a pickle belong to other settings
        self.n_features_out_ = self._embedding_size()
        return self

    def transform(self, X) -> np.ndarray:
        """Embed each product's pictures: float32 ``(n_products, n_features_out_)`` in input order."""
        check_is_fitted(self, "fingerprint_")
        products = image_refs(X, self.column)
        refs, owner = flatten_products(products)
        vectors, used = self._picture_vectors(refs)
        return self._pool(vectors, used, owner, len(products))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.non_deterministic = False
        return tags

    @property
    def _n_features_out(self) -> int:
        return self.n_features_out_

    # -- pictures to vectors ---------------------------------------------------
    def _cache(self) -> EmbeddingCache | None:
        if self.cache is None or isinstance(self.cache, EmbeddingCache):
            return self.cache
        return EmbeddingCache(self.cache)

    def _picture_vectors(self, refs: list) -> tuple[np.ndarray, np.ndarray]:
        """One vector per picture, and whether each picture was used (not skipped)."""
        cache = self._cache()
        if cache is None:
            return self._extract(refs, None, None)
        keys, readable = self._keys(refs)
        vectors = np.zeros((len(refs), self.n_features_out_), dtype=np.float32)
        used = np.ones(len(refs), dtype=bool)
        good = np.flatnonzero(readable)
        unique, first, inverse = np.unique(keys[good], return_index=True, return_inverse=True)
        found_vectors, found = cache.get(self.fingerprint_, unique)
        unique_vectors = np.zeros((len(unique), self.n_features_out_), dtype=np.float32)
        unique_used = np.ones(len(unique), dtype=bool)
        if found.any():
            unique_vectors[found] = found_vectors
        missing = np.flatnonzero(~found)
        if len(missing):
            computed, computed_used = self._extract([refs[good[first[m]]] for m in missing], cache, unique[missing])
            unique_vectors[missing], unique_used[missing] = computed, computed_used
        vectors[good], used[good] = unique_vectors[inverse], unique_used[inverse]
        if len(good) < len(refs):  # unreadable pictures have no key: the policy decides, nothing is cached
            bad = np.flatnonzero(~readable)
            vectors[bad], used[bad] = self._extract([refs[b] for b in bad], None, None)
        return vectors, used

    def _keys(self, refs: list) -> tuple[np.ndarray, np.ndarray]:
        """Content keys of the pictures, and which pictures could be read at all."""
        from .exceptions import ImageDecodeError

        contents, readable = [], np.ones(len(refs), dtype=bool)
        for i, ref in enumerate(refs):
            try:
                contents.append(picture_content(ref))
            except ImageDecodeError:
                if self.on_error == "raise":
                    raise
                readable[i] = False
                contents.append(b"")
        return EmbeddingCache.keys_for(contents), readable

    def _extract(self, refs: list, cache: EmbeddingCache | None, keys: np.ndarray | None):
        """Run the backbone over ``refs``; store decodable pictures' vectors in ``cache`` as they come."""
        import torch
        from tqdm.auto import tqdm

        from ._torch_data import PictureDataset, forward_pictures

        dataset = PictureDataset(
            refs, self.preprocessing_.transform(), self.on_error, self.preprocessing_.image_size,
            self.preprocessing_.draft_size, compact=self.num_workers > 0,
        )
        pending: list[tuple[np.ndarray, np.ndarray]] = []

        def store(positions: np.ndarray, vectors: np.ndarray) -> None:
            pending.append((keys[positions], vectors))
            if sum(len(k) for k, _ in pending) >= _FLUSH_EVERY:
                self._flush(cache, pending)

        progress = tqdm(total=len(refs), unit="img", disable=not self.verbose, desc=f"embedding ({self.backbone})")
        vectors, used = forward_pictures(
            self._model(), dataset, self.n_features_out_, batch_size=self.batch_size, num_workers=self.num_workers,
            device=torch.device(self.device_), precision=self.precision_, on_error=self.on_error, progress=progress,
            on_batch=None if cache is None else store,
        )
        if cache is not None:
            self._flush(cache, pending)
        return vectors, used

    def _flush(self, cache: EmbeddingCache, pending: list[tuple[np.ndarray, np.ndarray]]) -> None:
        if pending:
            keys, vectors = np.concatenate([k for k, _ in pending]), np.concatenate([v for _, v in pending])
            cache.put(self.fingerprint_, keys, vectors)
            pending.clear()

    def _pool(self, vectors: np.ndarray, used: np.ndarray, owner: np.ndarray, n_products: int) -> np.ndarray:
        out = np.zeros((n_products, vectors.shape[1]), dtype=np.float32)
        counts = np.bincount(owner[used], minlength=n_products)
        if self.pooling == "mean":
            np.add.at(out, owner[used], vectors[used])
            out /= np.maximum(counts, 1)[:, None]
        else:
            out.fill(-np.inf)
            np.maximum.at(out, owner[used], vectors[used])
            out[counts == 0] = 0.0
        if (counts == 0).any():
            logger.warning(
                "%d products had no decodable picture and got a zero vector (for example product %d)",
                int((counts == 0).sum()), int(np.flatnonzero(counts == 0)[0]),
            )
        return out

    # -- the model ---------------------------------------------------------------
    def _model(self):
        """The backbone on its device, built on first use."""
        if getattr(self, "_module", None) is None:
            import torch

            spec = parse_backbone(self.backbone)
            state = getattr(self, "_state_to_restore", None)
            weights = None if self.weights is None else os.fspath(self.weights)
            module = build_backbone(
                spec,
                pretrained=self.pretrained and state is None,
                weights=weights if state is None else None,
                image_size=self.image_size,
                seed=self.random_state,
            )
            if state is not None:
                module.load_state_dict(state)
                self._state_to_restore = None
            self._module = module.to(torch.device(self.device_), memory_format=torch.channels_last)
        return self._module

    def _embedding_size(self) -> int:
        cache = self._cache()
        if cache is not None:
            size = cache.dimension(self.fingerprint_)
            if size is not None:
                return size
        import torch

        module = self._model()
        probe = torch.zeros(1, 3, self.preprocessing_.image_size, self.preprocessing_.image_size)
        with torch.inference_mode():
            return int(module(probe.to(torch.device(self.device_))).shape[1])

    # -- persistence -------------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        module = state.pop("_module", None)
        if module is not None:
            state["_state_to_restore"] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
            state["_restored_for"] = (self.backbone, self._weights_id, self.image_size)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._module = None
        if hasattr(self, "device_"):
            from ._torch_data import device_available

            if not device_available(self.device_):
                # The precision stays: the vectors keep matching the fingerprint (and the cache), computed under
                # CPU autocast when it was bf16 or fp16.
                logger.info("this embedder ran on %s, which this machine lacks; it runs on the CPU", self.device_)
                self.device_ = "cpu"
