""":class:`ProductMatcher`: which products are the same product, from their vectors."""

from __future__ import annotations

import logging
import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from ..exceptions import EmptyProductWarning
from ._rules import blend, choose, connected_groups, f1_table
from ._search import l2_normalize, nearest_neighbors

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_THRESHOLDS", "ProductMatcher"]

#: The thresholds ``fit`` tries when ``thresholds=None`` (with ``local_scaling``, from -1: scaled scores go below 0).
DEFAULT_THRESHOLDS = np.round(np.arange(0.0, 1.0, 0.005), 3)
SCALED_THRESHOLDS = np.round(np.arange(-1.0, 1.0, 0.005), 3)
#: The neighbour counts ``tune="threshold+n_neighbors"`` tries (those up to ``n_neighbors``, and ``n_neighbors``).
NEIGHBOR_GRID = (1, 2, 3, 5, 10, 20, 50, 100, 200)
TUNE = ("threshold", "threshold+n_neighbors", "off")


class ProductMatcher(BaseEstimator):
    """Find the listings that show the same product: cosine k-nearest neighbours, a threshold, and tuning on groups.

    Each product (a row of ``X``, such as an :class:`~skproduct.ImageEmbedder`
    vector) is L2-normalised; its ``n_neighbors`` most similar products are
    found (an exact numpy search in bounded memory, or faiss); it matches those
    whose cosine similarity is at least ``threshold``, and, with
    ``at_least_one``, its nearest neighbour when none is (the rule of Shopee's
    Kaggle winners: a posting is rarely alone). With ``query_expansion``, each
    vector is first blended with its nearest neighbours' (neighbourhood
    blending), and the search runs again on the blended vectors.

    ``fit`` on labelled groups (``y``: one group label per product, Shopee's
    ``label_group``) tunes the threshold, and with the default ``tune`` the
    number of neighbours too, for Kaggle's score (the mean over products of
    the F1 between predicted and true match sets, each set including the
    product itself, :func:`skproduct.metrics.matching_f1_score`), which is
    what :meth:`score` returns. Tuned on training groups, the threshold is
    scored on other groups by ``GridSearchCV`` or ``cross_val_score`` with a
    group-aware split (``GroupKFold``, groups = ``y``), so that a group never
    straddles two folds.

    :meth:`matches` and :meth:`predict` match the products of ``X`` among
    themselves (match lists, and group ids: the connected components of the
    matches); :meth:`match_catalogue` matches new products against the fitted
    ones.

    Parameters
    ----------
    n_neighbors : int, default=50
        At most this many matches per product besides itself (and the
        neighbours searched). Tuned with ``tune="threshold+n_neighbors"``.
    threshold : float, default=0.8
        The least cosine similarity of a match. Tuned at ``fit`` when ``y`` is
        given and ``tune`` is not ``"off"``.
    at_least_one : bool, default=True
        A product whose neighbours are all under the threshold matches its
        nearest one all the same (not in :meth:`match_catalogue`, where a new
        product may well be new). Products with a zero vector never match.
    local_scaling : int, default=0
        Score pairs by cross-domain similarity local scaling (CSLS) instead of
        the bare cosine: ``2 cos(a, b) - r(a) - r(b)``, where ``r`` is a
        product's mean similarity to its ``local_scaling`` nearest neighbours
        (0: off). Products in a crowded region (many look-alikes: the hard
        negatives of a category) need a higher cosine to match. The threshold
        then applies to this score (which can be negative). ``matches``
        takes ``r`` from its own search; the catalogue's ``r``, which only
        :meth:`match_catalogue` needs, is computed by its first call, so
        ``fit`` without tuning searches nothing.
    query_expansion : int, default=0
        Blend each vector with this many nearest neighbours before matching
        (0: off), weighted by similarity to the power ``expansion_alpha``.
    expansion_alpha : float, default=3.0
        The power of the blending weights: higher trusts the closest more.
    tune : {"threshold+n_neighbors", "threshold", "off"}, default="threshold+n_neighbors"
        What ``fit(X, y)`` tunes on the groups of ``y``: the threshold and the
        number of neighbours (among 1, 2, 3, 5, 10, 20, 50, ... up to
        ``n_neighbors``), only the threshold, or nothing.
    thresholds : array-like of float, optional
        The thresholds tried; default 0, 0.005, ..., 0.995 (from -1 with ``local_scaling``).
    backend : {"exact", "faiss", "auto"}, default="exact"
        ``"exact"``: numpy, chunk by chunk so that at most 16 MiB of
        similarities (and about four times that in temporaries) are held at
        once, whatever the number of products; ``"faiss"``: the faiss index that
        ``faiss_index`` names (the ``matching`` extra, faiss-cpu); ``"auto"``:
        faiss from 50,000 products on when it is installed. With the exact
        ``"Flat"`` index, both give the same matches.
    faiss_index : str, default="Flat"
        A faiss index factory string: ``"Flat"`` (exact), or approximate ones
        for very large sets (``"HNSW32"``, ``"IVF1024,Flat"``).

    Attributes
    ----------
    threshold_ : float
        The threshold used (tuned, or ``threshold``).
    n_neighbors_ : int
        The neighbour count used (tuned, or ``n_neighbors``).
    best_score_ : float or None
        The training F1 at the tuned settings (``None`` when nothing was tuned).
    tuning_ : dict or None
        ``{"n_neighbors": ks, "thresholds": ts, "f1": table}``: the training F1
        of every setting tried, ``table[i, j]`` for ``ks[i]`` and ``ts[j]``.
    catalogue_ : ndarray of shape (n_catalogue, `n_features_in_`)
        The fitted products' unit vectors (blended with ``query_expansion``),
        which :meth:`match_catalogue` searches.
    n_features_in_ : int
        Vector size.

    See Also
    --------
    skproduct.matching.find_duplicates : Exact and near duplicates across two sets, and their labels.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> centres = rng.normal(size=(30, 16))
    >>> y = np.repeat(np.arange(30), 2)  # 30 products, two listings each
    >>> X = centres[y] + 0.1 * rng.normal(size=(60, 16))
    >>> matcher = ProductMatcher().fit(X, y)
    >>> round(matcher.score(X, y), 2)
    1.0
    >>> [m.tolist() for m in matcher.matches(X[:4])]  # positions in X[:4], each product first
    [[0, 1], [1, 0], [2, 3], [3, 2]]
    >>> matcher.predict(X[:4]).tolist()  # group ids
    [0, 0, 1, 1]
    >>> [m.tolist() for m in matcher.match_catalogue(X[:2] + 0.01)]  # positions in the fitted X
    [[0, 1], [1, 0]]
    """

    _parameter_constraints: dict = {
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "threshold": [Interval(Real, -1, 1, closed="both")],
        "at_least_one": ["boolean"],
        "local_scaling": [Interval(Integral, 0, None, closed="left")],
        "query_expansion": [Interval(Integral, 0, None, closed="left")],
        "expansion_alpha": [Interval(Real, 0, None, closed="left")],
        "tune": [StrOptions(set(TUNE))],
        "thresholds": ["array-like", None],
        "backend": [StrOptions({"exact", "faiss", "auto"})],
        "faiss_index": [str],
    }

    def __init__(
        self,
        n_neighbors: int = 50,
        *,
        threshold: float = 0.8,
        at_least_one: bool = True,
        local_scaling: int = 0,
        query_expansion: int = 0,
        expansion_alpha: float = 3.0,
        tune: str = "threshold+n_neighbors",
        thresholds=None,
        backend: str = "exact",
        faiss_index: str = "Flat",
    ):
        self.n_neighbors = n_neighbors
        self.threshold = threshold
        self.at_least_one = at_least_one
        self.local_scaling = local_scaling
        self.query_expansion = query_expansion
        self.expansion_alpha = expansion_alpha
        self.tune = tune
        self.thresholds = thresholds
        self.backend = backend
        self.faiss_index = faiss_index

    # -- fitting -------------------------------------------------------------------------------------------------
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Keep the products as the catalogue; with group labels ``y``, tune the threshold (and ``n_neighbors``).

        Parameters
        ----------
        X : array-like of shape (n_products, n_features)
            Product vectors.
        y : array-like of shape (n_products,), optional
            The group of each product (products of one group are the same
            product). Without it nothing is tuned.

        Returns
        -------
        self
        """
        if y is None:
            X = validate_data(self, X, dtype=[np.float32, np.float64])
        else:
            X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        unit, zero = self._normalize(X)
        self._raw_catalogue = unit if self.query_expansion else None
        self._catalogue_zero = zero
        self.catalogue_ = self._expand(unit, zero, unit) if self.query_expansion else unit
        self._catalogue_radius = None  # CSLS radii of the catalogue: computed by the first match_catalogue call
        self.threshold_, self.n_neighbors_ = float(self.threshold), int(self.n_neighbors)
        self.best_score_, self.tuning_ = None, None
        if y is not None and self.tune != "off":
            self._tune(np.unique(y, return_inverse=True)[1].ravel())
        return self

    def _tune(self, codes: np.ndarray) -> None:
        default = SCALED_THRESHOLDS if self.local_scaling else DEFAULT_THRESHOLDS
        thresholds = default if self.thresholds is None else np.asarray(self.thresholds, dtype=float)
        if thresholds.ndim != 1 or not len(thresholds) or not np.isfinite(thresholds).all():
            raise ValueError(f"thresholds must be a non-empty 1-D list of finite numbers, got {self.thresholds!r}")
        if self.tune == "threshold+n_neighbors":
            ks = sorted({k for k in NEIGHBOR_GRID if k < self.n_neighbors} | {int(self.n_neighbors)})
        else:
            ks = [int(self.n_neighbors)]
        sims, rows = self._within(self.catalogue_, self._catalogue_zero, max(ks))
        if sims.shape[1] == 0:
            logger.info("one product only: nothing to tune; threshold %.3f kept", self.threshold_)
            return
        table = f1_table(sims, rows, codes, ks, thresholds, self.at_least_one)
        # The best F1; among equal ones, the most neighbours (the threshold decides) and the middle of the best
        # thresholds' run.
        best = table.max()
        k_best = int(np.flatnonzero(np.isclose(table, best).any(axis=1))[-1])
        at_best = np.flatnonzero(np.isclose(table[k_best], best))
        self.n_neighbors_ = int(ks[k_best])
        self.threshold_ = float(thresholds[at_best[len(at_best) // 2]])
        self.best_score_ = float(best)
        self.tuning_ = {"n_neighbors": np.asarray(ks), "thresholds": thresholds, "f1": table}
        logger.info("tuned on %d products in %d groups: threshold %.3f, n_neighbors %d, training F1 %.4f",
                    len(codes), codes.max() + 1, self.threshold_, self.n_neighbors_, best)

    # -- matching X among itself ---------------------------------------------------------------------------------
    def matches(self, X, *, return_similarity: bool = False):
        """Match the products of ``X`` among themselves: each product's match list, itself first.

        Parameters
        ----------
        X : array-like of shape (n_products, n_features)
        return_similarity : bool, default=False
            Also return the cosine similarity of each match (1 for the product itself).

        Returns
        -------
        matches : list of ndarray of int
            For each product, the positions in ``X`` of the products it
            matches: itself first, then the others, most similar first.
        similarities : list of ndarray of float32
            Only with ``return_similarity``.
        """
        check_is_fitted(self, "catalogue_")
        unit, zero = self._normalize(validate_data(self, X, reset=False, dtype=[np.float32, np.float64]))
        if self.query_expansion:
            unit = self._expand(unit, zero, unit)
        sims, rows = self._within(unit, zero, self.n_neighbors_)
        return choose(sims, rows, self.threshold_, self.n_neighbors_, self.at_least_one,
                      return_similarity=return_similarity)

    def predict(self, X) -> np.ndarray:
        """Group ids of the products of ``X`` matched among themselves: the connected components of
        :meth:`matches` (products linked by a chain of matches share an id), numbered from 0 in order of first
        appearance.

        Returns
        -------
        ndarray of shape (n_products,), int64
        """
        return connected_groups(self.matches(X), len(X))

    def score(self, X, y, sample_weight=None) -> float:
        """Kaggle's product-matching F1 of :meth:`matches` on ``X`` against the groups ``y``.

        Parameters
        ----------
        X : array-like of shape (n_products, n_features)
        y : array-like of shape (n_products,)
            The true group of each product.
        sample_weight : array-like of shape (n_products,), optional

        Returns
        -------
        float
            The mean over products of the F1 between predicted and true match sets (each including the product).
        """
        from ..metrics.matching import matching_f1_score

        return matching_f1_score(y, self.matches(X), sample_weight=sample_weight)

    # -- matching new products against the catalogue ------------------------------------------------------------
    def match_catalogue(self, X, *, return_similarity: bool = False):
        """Match new products against the fitted ones (the catalogue): positions in the ``X`` given to ``fit``.

        A product matches the catalogue products whose similarity is at least
        ``threshold_`` (at most ``n_neighbors_``, most similar first); the
        at-least-one rule does not apply, so a product the catalogue lacks gets
        an empty list.

        Parameters
        ----------
        X : array-like of shape (n_products, n_features)
        return_similarity : bool, default=False
            Also return each match's cosine similarity.

        Returns
        -------
        matches : list of ndarray of int
        similarities : list of ndarray of float32
            Only with ``return_similarity``.
        """
        check_is_fitted(self, "catalogue_")
        unit, zero = self._normalize(validate_data(self, X, reset=False, dtype=[np.float32, np.float64]))
        if self.query_expansion:
            unit = self._expand(unit, zero, self._raw_catalogue, base_zero=self._catalogue_zero)
        sims, rows = self._search(unit, zero, self.catalogue_, self._catalogue_zero, self.n_neighbors_, False,
                                  base_radius=self._radius_of_catalogue())
        return choose(sims, rows, self.threshold_, self.n_neighbors_, False, return_similarity=return_similarity,
                      with_self=False)

    # -- helpers -------------------------------------------------------------------------------------------------
    def _normalize(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        unit, zero = l2_normalize(X)
        if zero.any():
            first = int(np.flatnonzero(zero)[0])
            warnings.warn(
                f"{int(zero.sum())} of {len(zero)} products have a zero vector (such as product {first}; an "
                "ImageEmbedder gives one to a product without a usable picture): they match nothing",
                EmptyProductWarning, stacklevel=3,
            )
        return unit, zero

    def _radius_of_catalogue(self) -> np.ndarray | None:
        """The catalogue's CSLS radii (each product's mean similarity to its ``local_scaling`` nearest others).

        Only :meth:`match_catalogue` needs them (:meth:`matches` scales ``X``
        within itself), so ``fit`` does not search the catalogue for them:
        the first call computes them once, as a cache derived from the
        fitted catalogue (the same numbers whenever they are computed).
        """
        if self.local_scaling and self._catalogue_radius is None:
            sims, _ = self._search(self.catalogue_, self._catalogue_zero, self.catalogue_, self._catalogue_zero,
                                   self.local_scaling, True, scale=False)
            self._catalogue_radius = _radius(sims)
        return self._catalogue_radius

    def _within(self, unit: np.ndarray, zero: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._search(unit, zero, unit, zero, k, True, scale=True)

    def _search(self, queries, query_zero, base, base_zero, k: int, within: bool, *, scale: bool | None = None,
                base_radius=None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best candidates of each query in ``base``: cosine, or with ``local_scaling`` (unless
        ``scale=False``) the CSLS score, zero vectors marked ``-inf``; most similar first."""
        scale = bool(self.local_scaling) if scale is None else scale and bool(self.local_scaling)
        width = max(k, self.local_scaling) if scale else k
        sims, rows = nearest_neighbors(queries, base, width, backend=self.backend, index=self.faiss_index,
                                       exclude_self=within)
        _mask_zero(sims, rows, query_zero, base_zero)
        if scale:
            radius = _radius(sims[:, : self.local_scaling])
            other = radius if within else base_radius
            sims = np.where(np.isfinite(sims), 2 * sims - radius[:, None] - other[rows], -np.inf).astype(np.float32)
            order = np.lexsort((rows, -sims), axis=1)[:, :k]
            sims, rows = np.take_along_axis(sims, order, axis=1), np.take_along_axis(rows, order, axis=1)
        return sims, rows

    def _expand(self, unit, zero, base, *, base_zero=None) -> np.ndarray:
        """Neighbourhood blending of ``unit`` with its ``query_expansion`` nearest rows of ``base``."""
        within = base is unit
        sims, rows = self._search(unit, zero, base, zero if within else base_zero, self.query_expansion, within,
                                  scale=False)
        return blend(unit, sims, rows, base, self.expansion_alpha)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = False
        tags.input_tags.sparse = False
        return tags


def _radius(sims: np.ndarray) -> np.ndarray:
    """Each row's mean similarity to its neighbours (the finite ones; 0 without any): CSLS's ``r``."""
    finite = np.isfinite(sims)
    total = np.where(finite, sims, 0).sum(axis=1)
    return (total / np.maximum(finite.sum(axis=1), 1)).astype(np.float32)


def _mask_zero(sims: np.ndarray, rows: np.ndarray, query_zero: np.ndarray, base_zero: np.ndarray) -> None:
    """Zero vectors never match: their candidates, and candidates that are zero vectors, get ``-inf`` and go last
    (in place)."""
    if query_zero.any() or base_zero.any():
        sims[query_zero] = -np.inf
        sims[base_zero[rows]] = -np.inf
        order = np.lexsort((rows, -sims), axis=1)
        sims[:] = np.take_along_axis(sims, order, axis=1)
        rows[:] = np.take_along_axis(rows, order, axis=1)
