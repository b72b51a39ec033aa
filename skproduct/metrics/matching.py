"""The F1 of product matching, as Kaggle's Shopee Product Matching competition scores it.

Each posting has a *true* set, every posting of its group (``label_group``)
itself included, and a *predicted* set, the postings it was matched with. Its
F1 is ``2 |true & predicted| / (|true| + |predicted|)``; the score is the mean
over postings. A posting's predicted set is taken as given: Kaggle's
submissions list the posting itself among its matches, and so does
:class:`~skproduct.ProductMatcher`; a set that leaves it out loses that point.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["groups_to_matches", "matching_f1_samples", "matching_f1_score"]


def _group_codes(y_true, what: str = "y_true") -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"{what} must be one group label per posting (1-D), got shape {y.shape}")
    try:
        return np.unique(y, return_inverse=True)[1].ravel()
    except TypeError as exc:
        raise ValueError(f"{what} holds labels that cannot be compared with one another: {exc}") from exc


def _pairs(matches: Sequence, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``(posting, matched posting)`` pairs of per-posting match lists."""
    if len(matches) != n:
        raise ValueError(f"y_pred has match lists for {len(matches)} postings, y_true labels for {n}: pass one each")
    lists = [np.asarray(m, dtype=np.int64).ravel() for m in matches]
    sizes = np.fromiter((len(m) for m in lists), dtype=np.int64, count=n)
    flat = np.concatenate(lists) if n else np.zeros(0, dtype=np.int64)
    outside = (flat < 0) | (flat >= n)
    if outside.any():
        bad = int(np.repeat(np.arange(n), sizes)[outside][0])
        raise ValueError(f"the match list of posting {bad} holds positions outside 0..{n - 1}: match lists hold "
                         "positions of postings (0-based)")
    owner = np.repeat(np.arange(n), sizes)
    codes = np.unique(owner * n + flat)
    return codes // n, codes % n


def matching_f1_samples(y_true, y_pred) -> np.ndarray:
    """Each posting's F1 between its predicted and its true match set.

    Parameters
    ----------
    y_true : array-like of shape (n_postings,)
        The group of each posting (Shopee's ``label_group``).
    y_pred : sequence of n_postings integer sequences, or array-like of shape (n_postings,)
        Either each posting's matches (positions of postings, 0-based, itself
        included, as :meth:`ProductMatcher.matches <skproduct.ProductMatcher.matches>`
        gives them), or predicted group ids (a number per posting: each posting
        then matches every posting with its id, as
        :meth:`ProductMatcher.predict <skproduct.ProductMatcher.predict>` gives them).

    Returns
    -------
    ndarray of shape (n_postings,)

    Examples
    --------
    >>> matching_f1_samples([7, 7, 8], [[0, 1], [1], [2]]).round(3).tolist()
    [1.0, 0.667, 1.0]
    """
    codes = _group_codes(y_true)
    n = len(codes)
    true_sizes = np.bincount(codes, minlength=codes.max() + 1 if n else 0)[codes] if n else np.zeros(0)
    if _is_group_ids(y_pred, n):
        pred = _group_codes(np.asarray(y_pred), "y_pred")
        pred_sizes = np.bincount(pred)[pred]
        both = np.unique(codes * (pred.max() + 1) + pred, return_inverse=True)[1].ravel()
        common = np.bincount(both)[both]
    else:
        owner, other = _pairs(y_pred, n)
        pred_sizes = np.bincount(owner, minlength=n)
        common = np.bincount(owner, weights=codes[owner] == codes[other], minlength=n)
    denominator = true_sizes + pred_sizes
    return np.where(denominator > 0, 2 * common / np.maximum(denominator, 1), 0.0).astype(float)


def matching_f1_score(y_true, y_pred, *, sample_weight=None) -> float:
    """Kaggle's product-matching score: the mean over postings of the F1 between predicted and true match sets.

    Parameters
    ----------
    y_true : array-like of shape (n_postings,)
        The group of each posting (Shopee's ``label_group``).
    y_pred : sequence of n_postings integer sequences, or array-like of shape (n_postings,)
        Each posting's matches (positions, itself included), or predicted
        group ids (see :func:`matching_f1_samples`).
    sample_weight : array-like of shape (n_postings,), optional
        Weights of the mean.

    Returns
    -------
    float

    Examples
    --------
    >>> round(matching_f1_score([7, 7, 8], [[0, 1], [1], [2]]), 4)  # posting 1 missed posting 0
    0.8889
    >>> matching_f1_score([7, 7, 8], [5, 5, 9])  # predicted group ids
    1.0
    """
    samples = matching_f1_samples(y_true, y_pred)
    if not len(samples):
        raise ValueError("matching_f1_score needs at least one posting")
    return float(np.average(samples, weights=sample_weight))


def groups_to_matches(groups) -> list[np.ndarray]:
    """Match lists from group ids: each posting matches every posting of its group (itself first).

    Examples
    --------
    >>> [m.tolist() for m in groups_to_matches(["a", "b", "a"])]
    [[0, 2], [1], [2, 0]]
    """
    codes = _group_codes(groups, "groups")
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(codes.max() + 1 if len(codes) else 0))
    members = np.split(order, starts[1:])
    out = []
    for i, code in enumerate(codes):
        group = members[code]
        out.append(np.concatenate([[i], group[group != i]]).astype(np.int64))
    return out


def _is_group_ids(y_pred, n: int) -> bool:
    """Whether ``y_pred`` is a flat array of one id per posting (rather than per-posting match lists)."""
    if isinstance(y_pred, np.ndarray):
        return y_pred.dtype != object and y_pred.ndim == 1
    if len(y_pred) == 0:
        return False
    return all(np.ndim(item) == 0 for item in y_pred) and not any(isinstance(item, (list, tuple, np.ndarray))
                                                                   for item in y_pred)
