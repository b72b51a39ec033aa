"""``skproduct match DATA``: which products of DATA are the same product, or (``--against``) already in a catalogue.

Without ``--against``, DATA's products are matched among themselves
(:class:`~skproduct.ProductMatcher`) and the output is Kaggle's Shopee
submission, ``posting_id,matches`` (the matches of a product, itself first,
separated by spaces). With ``--groups COLUMN`` (a CSV column of group labels,
Shopee's ``label_group``) the matches are scored with Kaggle's F1, and with
``--tune`` the threshold and neighbour count are first tuned on those groups.

With ``--against CATALOGUE``, each product of DATA is looked up in CATALOGUE:
exact duplicates (the same picture content) and near duplicates (vectors at
``--near-threshold`` or above). The output has one row per product of DATA:
``posting_id,matches,kind,similarity`` (the catalogue ids of its duplicates,
best first; ``exact``, ``near`` or empty; the best one's similarity), plus the
catalogue's label of the best duplicate when the catalogue is labelled: the
label lookup that turns a duplicate into a prediction.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import numpy as np

from . import CommandError

logger = logging.getLogger(__name__)

__all__ = ["add_match_command", "run_match"]

MATCH_COLUMNS = ("posting_id", "matches")
BACKENDS = ("exact", "faiss", "auto")


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not -1 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a cosine similarity between -1 and 1, got {text!r}")
    return value


def add_match_command(commands, add_command: Callable[..., argparse.ArgumentParser], parents: list,
                      positive_int: Callable[[str], int]) -> None:
    """Add ``skproduct match`` to the ``skproduct`` subparsers (``parents``: the data, backbone and runtime
    option groups that ``extract`` takes)."""
    parser = add_command(
        commands, "match", "find the products that are the same product (or already in a catalogue)",
        """Match the products of DATA among themselves by the cosine similarity of
their embeddings, and write Kaggle's posting_id,matches (each product's matches,
itself first, separated by spaces). Each product matches the products at
--threshold or above (at most --neighbors), and its nearest one when none is
(drop that rule with --no-at-least-one). --groups COLUMN scores the matches with
Kaggle's F1 against a CSV column of group labels; --tune first tunes the
threshold and neighbour count on those groups.

--against CATALOGUE looks each product of DATA up in CATALOGUE instead: exact
duplicates (the same picture content) and near duplicates (--near-threshold),
written as posting_id,matches,kind,similarity and, when CATALOGUE is labelled,
the label of the best duplicate (a prediction for the product).

examples:
  skproduct match postings.csv --images images --backbone timm:tf_efficientnet_lite0 \\
      --weights lite0.pth --cache ~/emb --out matches.csv
  skproduct match test.bson --against train.bson --cache ~/emb --out duplicates.csv""",
        parents,
    )
    parser.add_argument("data", metavar="DATA", help="a .bson file, or a .csv file of images")
    parser.add_argument("--out", required=True, metavar="FILE", help="the CSV to write ('-': stdout)")
    parser.add_argument("--against", metavar="CATALOGUE",
                        help="find DATA's duplicates in this .bson or .csv catalogue instead of matching DATA")
    parser.add_argument("--against-images", metavar="DIR",
                        help="the image folder of a CSV CATALOGUE (default: 'images' beside it)")
    rules = parser.add_argument_group("matching")
    rules.add_argument("--threshold", type=_probability, default=0.75, metavar="SIM",
                       help="the least cosine similarity of a match (default: %(default)s)")
    rules.add_argument("--neighbors", type=positive_int, default=50, metavar="K",
                       help="at most K matches per product besides itself (default: %(default)s)")
    rules.add_argument("--at-least-one", action=argparse.BooleanOptionalAction, default=True,
                       help="a product matches its nearest neighbour when none reaches the threshold (default: yes)")
    rules.add_argument("--local-scaling", type=int, default=0, metavar="K",
                       help="score pairs by CSLS over each product's K nearest neighbours instead of the cosine: "
                            "look-alike crowds need more to match; --threshold then applies to that score "
                            "(default: 0, off)")
    rules.add_argument("--query-expansion", type=int, default=0, metavar="N",
                       help="blend each vector with its N nearest neighbours' first (default: 0, off)")
    rules.add_argument("--backend", choices=BACKENDS, default="exact",
                       help="nearest-neighbour search: numpy, faiss (pip install faiss-cpu), or faiss for large sets "
                            "when installed (default: %(default)s)")
    rules.add_argument("--groups", metavar="COLUMN",
                       help="a CSV column of group labels (Shopee's label_group): score the matches against it")
    rules.add_argument("--tune", action="store_true",
                       help="with --groups: tune the threshold and neighbour count on those groups first")
    rules.add_argument("--near-threshold", type=_probability, default=0.95, metavar="SIM",
                       help="with --against: the least similarity of a near duplicate (default: %(default)s)")
    parser.set_defaults(run=run_match)


def run_match(args: argparse.Namespace) -> None:
    """``skproduct match DATA --out FILE [--against CATALOGUE]``."""
    from ._commands import _check_device, _embedder_from_args, _resolve_embedder
    from ._data import check_folder_option, check_outputs, read_data

    check_outputs([("--out", args.out)], [args.data, args.against, args.weights], to_stdout=["--out"])
    check_folder_option("--cache", args.cache)
    if args.tune and args.groups is None:
        raise CommandError("--tune needs group labels to tune on: pass --groups COLUMN (a CSV column)")
    if args.against_images is not None and args.against is None:
        raise CommandError("--against-images is the image folder of --against CATALOGUE: pass --against too")
    if args.groups is not None and args.against is not None:
        raise CommandError("--groups scores matches within DATA; it does not apply with --against")
    for option in ("query_expansion", "local_scaling"):
        if getattr(args, option) < 0:
            raise CommandError(f"--{option.replace('_', '-')} must be 0 or more, got {getattr(args, option)}")
    if args.groups is not None:
        if not args.data.lower().endswith(".csv"):
            raise CommandError(f"--groups names a CSV column, and {args.data} is not a .csv file")
        args.label_column = args.groups
    if args.backend == "faiss":
        from ..matching._search import faiss_module

        try:
            faiss_module()
        except ImportError as exc:
            raise CommandError(str(exc).replace("backend='exact'", "--backend exact")) from exc
    if args.device is not None:
        _check_device(args.device)
    embedder = _embedder_from_args(args)
    _resolve_embedder(embedder)  # the backbone options are checked before any picture is read
    data = read_data(args.data, args, need_labels=args.groups is not None)
    start = time.perf_counter()
    vectors = _vectors(embedder, data)
    if args.against is None:
        _match_within(args, data, vectors, start)
    else:
        catalogue_args = argparse.Namespace(**{**vars(args), "label_column": None, "images": args.against_images})
        catalogue = read_data(args.against, catalogue_args, need_labels=False)
        _match_against(args, data, vectors, catalogue, _vectors(embedder, catalogue), start)


def _vectors(embedder, data) -> np.ndarray:
    """Every product's vector; products without a picture to read (``--on-missing drop``) get a zero vector."""
    present = embedder.transform(data.frame)
    if data.absent is None:
        return present
    out = np.zeros((len(data.ids), present.shape[1]), dtype=present.dtype)
    out[~data.absent] = present
    return out


def _matcher(args: argparse.Namespace):
    from ..matching import ProductMatcher

    return ProductMatcher(
        args.neighbors, threshold=args.threshold, at_least_one=args.at_least_one,
        query_expansion=args.query_expansion, local_scaling=args.local_scaling, backend=args.backend,
        tune="threshold+n_neighbors" if args.tune else "off",
    )


def _ids_text(ids: np.ndarray, lists) -> list[str]:
    text = np.asarray([str(i) for i in ids.tolist()], dtype=object)
    return [" ".join(text[m].tolist()) for m in lists]


def _match_within(args: argparse.Namespace, data, vectors: np.ndarray, start: float) -> None:
    import pandas as pd

    from ..metrics.matching import matching_f1_score
    from ._commands import _summary_stream
    from ._data import save

    matcher = _matcher(args).fit(vectors, data.labels if args.tune else None)
    matches = matcher.matches(vectors)
    seconds = time.perf_counter() - start
    frame = pd.DataFrame({MATCH_COLUMNS[0]: data.ids, MATCH_COLUMNS[1]: _ids_text(data.ids, matches)})
    save(args.out, lambda f: frame.to_csv(f, index=False), mode="w")
    out = _summary_stream(args.out)
    matched = sum(len(m) > 1 for m in matches)
    groups = len(np.unique(matcher.predict(vectors)))
    print(f"matched {len(data.ids)} products of {args.data} in {seconds:.1f} s: {matched} have matches, "
          f"{groups} groups (threshold {matcher.threshold_:g}, at most {matcher.n_neighbors_} matches each)", file=out)
    if args.tune:
        print(f"tuned on the groups of --groups {args.groups}: threshold {matcher.threshold_:g}, "
              f"--neighbors {matcher.n_neighbors_}", file=out)
    if args.groups is not None:
        print(f"F1 against --groups {args.groups} (Kaggle's mean per-product F1): "
              f"{matching_f1_score(data.labels, matches):.4f}" + (" (tuned on these groups)" if args.tune else ""),
              file=out)
    print(f"wrote {'stdout' if args.out == '-' else args.out} with columns {','.join(MATCH_COLUMNS)}", file=out)


def _match_against(args: argparse.Namespace, data, vectors, catalogue, catalogue_vectors, start: float) -> None:
    import pandas as pd

    from ..matching import content_keys, duplicate_labels, find_duplicates
    from ._commands import _summary_stream
    from ._data import save

    present = slice(None) if data.absent is None else ~data.absent
    keys = [np.zeros(0, dtype="S16")] * len(data.ids)
    for position, k in zip(np.arange(len(data.ids))[present], content_keys(data.frame, on_error="skip"),
                           strict=True):
        keys[position] = k
    catalogue_keys = [np.zeros(0, dtype="S16")] * len(catalogue.ids)
    where = slice(None) if catalogue.absent is None else ~catalogue.absent
    for position, k in zip(np.arange(len(catalogue.ids))[where], content_keys(catalogue.frame, on_error="skip"),
                           strict=True):
        catalogue_keys[position] = k
    duplicates = find_duplicates(keys, catalogue_keys, vectors, catalogue_vectors, threshold=args.near_threshold,
                                 n_neighbors=args.neighbors, backend=args.backend)
    seconds = time.perf_counter() - start
    n = len(data.ids)
    best = duplicates.drop_duplicates("query", keep="first").set_index("query")
    lists = [[] for _ in range(n)]
    for q, c in zip(duplicates["query"].tolist(), duplicates["catalogue"].tolist(), strict=True):
        lists[q].append(c)
    kind = np.full(n, "", dtype=object)
    similarity = np.full(n, np.nan)
    kind[best.index.to_numpy()] = best["kind"].to_numpy()
    similarity[best.index.to_numpy()] = best["similarity"].to_numpy()
    columns = {
        MATCH_COLUMNS[0]: data.ids,
        MATCH_COLUMNS[1]: _ids_text(np.asarray(catalogue.ids), [np.asarray(m, dtype=np.int64) for m in lists]),
        "kind": kind,
        "similarity": np.round(similarity, 4),
    }
    if catalogue.labels is not None:
        labels, _ = duplicate_labels(duplicates, catalogue.labels, n, fill=None)
        columns[catalogue.columns[1]] = labels
    frame = pd.DataFrame(columns)
    save(args.out, lambda f: frame.to_csv(f, index=False), mode="w")
    out = _summary_stream(args.out)
    exact, near = int((kind == "exact").sum()), int((kind == "near").sum())
    print(f"looked up {n} products of {args.data} in {len(catalogue.ids)} of {args.against} in {seconds:.1f} s: "
          f"{exact} exact duplicates, {near} near duplicates (similarity >= {args.near_threshold:g}), "
          f"{n - exact - near} without", file=out)
    if catalogue.labels is not None:
        print(f"the {exact + near} with a duplicate take its {catalogue.columns[1]} from {args.against}", file=out)
    print(f"wrote {'stdout' if args.out == '-' else args.out} with columns {','.join(frame.columns)}", file=out)
