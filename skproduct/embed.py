"""ImageEmbedder: a scikit-learn transformer from product pictures to backbone embeddings."""

from __future__ import annotations

import logging
import os
from numbers import Integral

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .backbones import build_backbone, fingerprint, parse_backbone, resolve_preprocessing, weights_identity
from .cache import EmbeddingCache
from .distributed._context import distributed_extractor
from .image_pipeline import IMAGE_ESTIMATOR_CONSTRAINTS, ImageEstimatorMixin, flatten_products, pool_products
from .image_pipeline.keys import bson_images, bson_picture_keys
from .image_pipeline.outputs import check_out, vector_output
from .images import picture_content

logger = logging.getLogger(__name__)

__all__ = ["ImageEmbedder"]

_FLUSH_EVERY = 2048  # vectors written to the cache together
_POOL_BLOCK = 8192  # images pooled together from the table of unique vectors
_LOOKUP_BLOCK = 65536  # pictures looked up (and their table of vectors held) together


class ImageEmbedder(ImageEstimatorMixin, ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
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
        Decided at every call: ``set_params(device=...)`` on a fitted embedder
        moves it without refitting, and its cache keys stay the same.
    batch_size : int, default=64
        Pictures per forward pass.
    num_workers : int, default=0
        DataLoader worker processes that decode and preprocess pictures.
    precision : {"auto", "fp32", "bf16", "fp16"}, default="auto"
        ``"auto"``: bf16 (or fp16) autocast on CUDA; on CPUs bf16 where the CPU
        computes it natively (AMX or AVX512-BF16), fp32 elsewhere; ``"bf16"``
        also runs on other CPUs. Part of the fingerprint: fixed at fit and kept by
        later calls wherever their device can run it. A cache filled at one
        precision is reused on any machine by pinning it (``precision="fp32"``).
    image_size : int, optional
        Input side in pixels; defaults to the backbone's own.
    pooling : {"mean", "max"}, default="mean"
        How a product's pictures are combined.
    column : str, optional
        The DataFrame column holding the pictures (default ``"images"``, then ``"image"``).
    cache : str, path-like or EmbeddingCache, optional
        Where vectors are kept; ``None`` keeps none.
    out : {"memory", "memmap", "auto"} or path, default="memory"
        Where :meth:`transform` puts the product vectors: an array in memory;
        ``"memmap"``, a read-only :class:`numpy.memmap` of a ``.npy`` file in the
        cache folder's ``.vectors/`` (written chunk by chunk, atomically), that
        scikit-learn and the torch heads read without a copy; ``"auto"``, a
        memmap above 2 GiB; or a path, an ``.npy`` file there. Trade-offs:
        :mod:`skproduct.image_pipeline.outputs`.
    on_error : {"raise", "skip", "blank"}, default="raise"
        The policy for pictures that do not decode
        (:class:`~skproduct.images.BadImagePolicy`). A product whose pictures
        were all skipped gets a zero vector, with a warning.
    verbose : int, default=0
        ``> 0`` shows a progress bar during extraction.
    random_state : int, default=0
        Seed of the random weights when ``pretrained=False``, so that clones
        share their weights and their fingerprint.
    runtime : {"torch", "openvino", "onnxruntime", "auto"}, default="torch"
        The inference engine (:mod:`skproduct.runtimes`): OpenVINO and ONNX
        Runtime run the backbone exported once to ONNX beside the cache, on
        CPUs, at the precision of the fingerprint; ``"auto"`` takes the first
        installed of :data:`skproduct.runtimes.AUTO_ORDER` on a CPU, torch on
        a GPU. A runtime other than torch is part of the fingerprint.
    decode : {"cpu", "device", "auto"}, default="cpu"
        ``"cpu"``: pictures decoded and resized with PIL (in DataLoader
        workers). ``"device"``: JPEG bytes decoded in batches by
        ``torchvision.io.decode_jpeg`` on the embedder's device and resized
        and normalised there (:mod:`skproduct.image_pipeline.device_decode`);
        its resizing differs slightly from PIL's, so it has its own
        fingerprint. ``"auto"``: ``"device"`` on CUDA, ``"cpu"`` elsewhere.
    compile : bool, default=False
        ``torch.compile`` the backbone (torch runtime only); pays on GPUs for
        long extractions, costs a compilation at the first batch.

    Attributes
    ----------
    fingerprint_ : str
        The cache key of this backbone, weights, preprocessing and precision.
    preprocessing_ : Preprocessing
        Resize, crop and normalisation used.
    device_ : str
        The device of the fit (later calls run where ``device`` says then).
    precision_ : str
        The precision of the fit (``"fp32"``, ``"bf16"`` or ``"fp16"``).
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
        **IMAGE_ESTIMATOR_CONSTRAINTS,
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "cache": [str, os.PathLike, EmbeddingCache, None],
        "out": [str, os.PathLike],
        "runtime": [StrOptions({"torch", "openvino", "onnxruntime", "auto"})],
        "decode": [StrOptions({"cpu", "device", "auto"})],
        "compile": ["boolean"],
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
        out: str | os.PathLike = "memory",
        on_error: str = "raise",
        verbose: int = 0,
        random_state: int = 0,
        runtime: str = "torch",
        decode: str = "cpu",
        compile: bool = False,
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
        self.out = out
        self.on_error = on_error
        self.verbose = verbose
        self.random_state = random_state
        self.runtime = runtime
        self.decode = decode
        self.compile = compile

    # -- scikit-learn protocol -------------------------------------------------
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None):
        """Resolve the backbone, its preprocessing, device, precision and fingerprint.

        Nothing is learned from ``X``: the backbone is pretrained (or seeded).
        The model itself is built on first use, and not at all when every
        picture is cached; the vector size is read from the cache or from the
        model, never from a forward pass.
        """
        spec = parse_backbone(self.backbone)
        device = self._fit_device()
        self.preprocessing_ = resolve_preprocessing(spec, self.image_size)
        weights = None if self.weights is None else os.fspath(self.weights)
        self._weights_id = weights_identity(spec, self.pretrained, weights, self.random_state)
        self.fingerprint_ = self._call_fingerprint(self.precision_, fitting=True)
        self._module = self._engine = None
        if getattr(self, "_restored_for", None) != (self.backbone, self._weights_id, self.image_size):
            self._state_to_restore = None  # weights from a pickle belong to other settings
        self.n_features_out_ = self._embedding_size(device)
        return self

    def transform(self, X) -> np.ndarray:
        """Embed each product's pictures: float32 ``(n_products, n_features_out_)`` in input order.

        Runs on the device the ``device`` parameter names now; pictures are
        pooled into products chunk by chunk as they stream from the backbone.
        """
        check_is_fitted(self, "fingerprint_")
        products = self._products(X)
        refs, owner = flatten_products(products)
        device, precision = self._call_device()
        check_out(self.out)
        cache = self._cache()
        with vector_output(self.out, (len(products), self.n_features_out_), name=self.fingerprint_,
                           cache_folder=None if cache is None else cache.directory) as out:
            batches = self._image_vectors(refs, device, precision, source=X)
            for start, rows in pool_products(batches, owner, how=self.pooling, fallback_name="a zero vector"):
                out.array[start : start + len(rows)] = rows
        return out.result

    # -- pictures to vectors ---------------------------------------------------
    def _cache(self) -> EmbeddingCache | None:
        if self.cache is None or isinstance(self.cache, EmbeddingCache):
            return self.cache
        return EmbeddingCache(self.cache)

    def _call_fingerprint(self, precision: str, fitting: bool = False) -> str:
        """The cache key of this call's vectors: the fit's, unless the precision had to fall back."""
        if precision == self.precision_ and not fitting:
            return self.fingerprint_
        return fingerprint(parse_backbone(self.backbone), self._weights_id, self.preprocessing_, precision,
                           runtime=getattr(self, "runtime_", "torch"), decode=getattr(self, "decode_", "cpu"))

    def _fit_device(self):
        """``device_``, ``precision_`` (bf16 on CPUs with native bf16 for ``"auto"``), ``runtime_`` and ``decode_``."""
        from .image_pipeline.device import resolve_precision
        from .image_pipeline.device_decode import resolve_decode
        from .runtimes import resolve_runtime

        device = self._call_device_only()
        precision = resolve_precision(self.precision, device, inference=True)
        self.runtime_, self.precision_ = resolve_runtime(self.runtime, device, precision, precision_asked=self.precision)
        self.device_, self.decode_ = str(device), resolve_decode(self.decode, device)
        return device

    def _image_vectors(self, refs: list, device, precision: str, source=None):
        """Yield ``(positions, vectors, used)`` over every picture of ``refs``, in order.

        Without a cache the backbone's batches stream straight to pooling.
        With one, each distinct picture is looked up or extracted once (and
        stored as it is computed), then the pictures are yielded in blocks.
        """
        cache = self._cache()
        remote = distributed_extractor(self, cache)  # None outside a skproduct.distributed.cluster(...) block
        if cache is None:
            for positions, vectors, used, _ in self._batches(refs, device, precision):
                yield positions, vectors, used
            return
        key = self._call_fingerprint(precision)
        all_keys, all_readable, located = self._keys(refs, source)
        for begin in range(0, len(refs), _LOOKUP_BLOCK):  # memory: one block of pictures' vectors, not the catalogue
            end = min(len(refs), begin + _LOOKUP_BLOCK)
            for positions, vectors, used in self._block_vectors(
                refs[begin:end], all_keys[begin:end], all_readable[begin:end], cache, key, remote, device, precision,
                located=located,
            ):
                yield positions + begin, vectors, used

    def _block_vectors(self, refs, keys, readable, cache, key, remote, device, precision, located=False):
        """:meth:`_image_vectors` over one block of pictures (positions within the block)."""
        good, bad = np.flatnonzero(readable), np.flatnonzero(~readable)
        unique, first, inverse = np.unique(keys[good], return_index=True, return_inverse=True)
        # One table: a row per distinct readable picture, then one per unreadable picture (no key, never cached).
        table = np.zeros((len(unique) + len(bad), self.n_features_out_), dtype=np.float32)
        table_used = np.ones(len(table), dtype=bool)
        unique_vectors, found = cache.get(key, unique)
        if found.any():
            table[np.flatnonzero(found)] = unique_vectors
        missing = np.flatnonzero(~found)
        if len(missing) and located:
            # Pictures keyed by their place in a BSON file may sit in the cache under their content key (caches
            # filled before place keys): found there, they are copied to their place key and never recomputed.
            moved, vectors = self._found_by_content([refs[good[first[m]]] for m in missing], cache, key,
                                                    unique[missing])
            if len(moved):
                table[missing[moved]] = vectors
                missing = np.delete(missing, moved)
        if len(missing):
            (self._extract_into if remote is None else remote.extract_into)(
                [refs[good[first[m]]] for m in missing], table, table_used, missing, cache, key, unique[missing],
                device, precision,
            )
        if len(bad):  # the bad-image policy decides what these give
            for positions, vectors, used, _ in self._batches([refs[b] for b in bad], device, precision):
                table[len(unique) + positions], table_used[len(unique) + positions] = vectors, used
        place = np.empty(len(refs), dtype=np.int64)
        place[good], place[bad] = inverse, len(unique) + np.arange(len(bad))
        for start in range(0, len(refs), _POOL_BLOCK):
            rows = place[start : start + _POOL_BLOCK]
            yield np.arange(start, start + len(rows)), table[rows], table_used[rows]

    @staticmethod
    def _found_by_content(refs: list, cache: EmbeddingCache, key: str, place_keys: np.ndarray):
        """``(indices, vectors)`` of the ``refs`` cached under their content key; stored under ``place_keys`` too."""
        from .exceptions import ImageDecodeError

        def contents():
            for ref in refs:
                try:
                    yield picture_content(ref)
                except ImageDecodeError:
                    yield b""  # extraction will apply the bad-picture policy

        vectors, found = cache.get(key, EmbeddingCache.keys_for(contents()))
        cache.misses -= len(refs)  # counted by the place-key lookup already: one hit or one miss per picture
        indices = np.flatnonzero(found)
        if len(indices):
            cache.put(key, place_keys[indices], vectors)
        return indices, vectors

    def _keys(self, refs: list, source=None) -> tuple[np.ndarray, np.ndarray, bool]:
        """Keys of the pictures, which pictures could be read at all, and whether the keys are BSON place keys
        (rather than content keys)."""
        from .exceptions import ImageDecodeError

        images = bson_images(source, self.column)  # BSON pictures: keys from their byte ranges, in numpy
        if images is not None and len(images) == len(source):
            return bson_picture_keys(images), np.ones(len(refs), dtype=bool), True

        readable = np.ones(len(refs), dtype=bool)

        def contents():  # one picture's bytes at a time: memory never holds every picture
            for i, ref in enumerate(refs):
                try:
                    yield picture_content(ref)
                except ImageDecodeError:
                    if self.on_error == "raise":
                        raise
                    readable[i] = False
                    yield b""

        return EmbeddingCache.keys_for(contents()), readable, False

    def _batches(self, refs: list, device, precision: str):
        """The backbone over ``refs`` in order (:func:`~skproduct.image_pipeline.data.run_module`)."""
        from .image_pipeline.data import run_module

        if getattr(self, "decode_", "cpu") == "device":
            from .image_pipeline.device_decode import run_device_decoded as run_module
        return run_module(
            self._engine_for(device, precision), refs, self.preprocessing_, batch_size=self.batch_size,
            num_workers=self.num_workers,
            device=device, precision=precision, on_error=self.on_error, verbose=self.verbose,
            desc=f"embedding ({self.backbone})",
        )

    def _extract_into(self, refs, table, table_used, rows, cache, key, keys, device, precision) -> None:
        """Extract ``refs`` into ``table[rows]``; store the decodable pictures' vectors in ``cache`` as they come."""
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        try:
            for positions, vectors, used, decoded in self._batches(refs, device, precision):
                table[rows[positions]], table_used[rows[positions]] = vectors, used
                pending.append((keys[positions[decoded]], vectors[decoded]))
                if sum(len(k) for k, _ in pending) >= _FLUSH_EVERY:
                    self._flush(cache, key, pending)
        finally:  # interrupted (Ctrl-C) or failed half-way: the finished vectors are kept all the same
            self._flush(cache, key, pending)

    def _flush(self, cache: EmbeddingCache, key: str, pending: list[tuple[np.ndarray, np.ndarray]]) -> None:
        if pending:
            keys, vectors = np.concatenate([k for k, _ in pending]), np.concatenate([v for _, v in pending])
            if len(keys):
                cache.put(key, keys, vectors)
            pending.clear()

    # -- the model ---------------------------------------------------------------
    def _model(self, device):
        """The backbone on ``device``, built on first use (and moved when the call's device changes)."""
        import torch

        if getattr(self, "_module", None) is None:
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
            self._module, self._module_device = module, None
        if self._module_device != device:
            self._module = self._module.to(device, memory_format=torch.channels_last)
            self._module_device = device
        return self._module

    def _engine_for(self, device, precision: str):
        """The engine of this call (:mod:`skproduct.runtimes`): the torch module, or an exported one built once."""
        runtime = getattr(self, "runtime_", "torch")
        if runtime == "torch":
            module = self._model(device)
            if getattr(self, "compile", False):
                import torch

                if getattr(self, "_compiled_for", None) is not module:
                    self._compiled, self._compiled_for = torch.compile(module), module
                return self._compiled
            return module
        if device.type != "cpu":
            raise ValueError(f"this embedder runs runtime={runtime!r}, which runs on CPUs only, and the device is "
                             f"{device}: set_params(device='cpu'), or refit with runtime='torch'")
        engine = getattr(self, "_engine", None)
        if engine is None or engine.precision != precision:
            from .runtimes import build_engine, export_folder

            export_key = fingerprint(parse_backbone(self.backbone), self._weights_id, self.preprocessing_, "fp32")
            engine = build_engine(
                runtime, precision, module_factory=lambda: self._model(device), export_key=export_key,
                folder=export_folder(self._cache()), input_size=self.preprocessing_.input_size,
            )
            self._engine = engine
        return engine

    def _embedding_size(self, device) -> int:
        cache = self._cache()
        if cache is not None:
            size = cache.dimension(self.fingerprint_)
            if size is not None:
                return size
        from .image_pipeline.data import feature_size

        return feature_size(self._model(device), self.preprocessing_.input_size)

    # -- persistence -------------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        for name in ("_engine", "_compiled", "_compiled_for"):
            state.pop(name, None)
        module = state.pop("_module", None)
        if module is not None:
            state["_state_to_restore"] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
            state["_restored_for"] = (self.backbone, self._weights_id, self.image_size)
        return state

    def __setstate__(self, state):
        # embedders saved before these parameters: what they did then
        for name, before in (("out", "memory"), ("runtime", "torch"), ("decode", "cpu"), ("compile", False)):
            state.setdefault(name, before)
        super().__setstate__(state)
        self._module = self._engine = None
