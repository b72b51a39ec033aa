"""The ``skproduct`` argument parser: one subparser per command, built from shared option groups."""

from __future__ import annotations

import argparse

from ..distributed._cli import add_cluster_options, with_cluster
from . import CommandError
from ._cache_command import add_cache_command
from ._commands import run_demo, run_evaluate, run_extract, run_fit, run_predict
from ._match_command import add_match_command

HEADS = ("logistic", "linear", "lgbm", "hierarchical", "finetune")
LOCAL_ESTIMATORS = ("logistic", "linear", "lgbm")
STRATEGIES = ("per_level", "per_parent", "flat", "tree")
ON_ERROR = ("raise", "skip", "blank")
ON_TRUNCATED = ("raise", "warn")
ON_MISSING = ("raise", "drop")
TRUSTED_MODELS = """Model files are joblib pickles: loading one runs the code it holds, so load
only model files from a trusted source (such as your own 'skproduct fit')."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are :class:`CommandError`, reported like every other mistake."""

    def error(self, message: str):
        raise CommandError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The ``skproduct`` argument parser, with one subparser per command.

    Returns
    -------
    argparse.ArgumentParser
        Parsed arguments carry ``run``, the function of the chosen command.
    """
    from .. import __version__

    parser = _Parser(
        prog="skproduct",
        description="Sort product photos into catalogue categories: embed with a backbone, fit a head, predict.",
        epilog="Run 'skproduct COMMAND --help' for a command's options. Start with 'skproduct demo'.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"skproduct {__version__}")
    # -v and -q before the command too ("skproduct -v predict ..."); main merges them with the command's own.
    parser.add_argument("-v", "--verbose", dest="verbose_first", action="store_true", help="as a command's -v")
    parser.add_argument("-q", "--quiet", dest="quiet_first", action="store_true", help="as a command's -q")
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    _add_fit(commands)
    _add_predict(commands)
    _add_extract(commands)
    _add_evaluate(commands)
    _add_demo(commands)
    add_cache_command(commands, _add_command)
    add_match_command(commands, _add_command, [_data_options(), _backbone_options(), _runtime_options(on_error="skip")],
                      _positive_int)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text!r}")
    return value


def _output_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("output")
    group.add_argument(
        "-v", "--verbose", action="store_true",
        help="log what is happening (logging at INFO), and show the traceback of an error",
    )
    group.add_argument("-q", "--quiet", action="store_true", help="hide the progress bars")
    return parent


def _data_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("data (CSV input)")
    group.add_argument(
        "--images", metavar="DIR",
        help="the image folder of a CSV (flat, or one folder per category); default: 'images' beside the CSV",
    )
    group.add_argument(
        "--label-column", metavar="NAME",
        help="the CSV's label column (default: 'category' when the CSV has one); BSON labels are 'category_id'",
    )
    problems = parent.add_argument_group("data (damaged input)")
    problems.add_argument(
        "--on-truncated", choices=ON_TRUNCATED, default="raise",
        help="a .bson file that ends inside a product (an interrupted download): stop, or keep the whole products "
        "before the cut, with a warning (default: %(default)s)",
    )
    problems.add_argument(
        "--on-missing", choices=ON_MISSING, default="raise",
        help="CSV rows whose image file is missing or unreadable: stop, or go on with a warning: 'fit' leaves them "
        "out, 'predict' and 'evaluate' answer them from the training prior, 'extract' gives them a zero vector "
        "(default: %(default)s)",
    )
    return parent


def _backbone_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("backbone")
    group.add_argument(
        "--backbone", default="timm:resnet50",
        help="'timm:<model>' or 'open_clip:<model>/<pretrained tag>' (default: %(default)s)",
    )
    group.add_argument(
        "--pretrained", action=argparse.BooleanOptionalAction, default=True,
        help="download pretrained weights; --no-pretrained for random (seeded) weights (default: pretrained)",
    )
    group.add_argument("--weights", metavar="FILE", help="a local weights file (offline use); wins over --pretrained")
    group.add_argument(
        "--image-size", type=_positive_int, metavar="PIXELS", help="input side in pixels (default: the backbone's)"
    )
    group.add_argument(
        "--random-state", type=int, default=0, metavar="SEED",
        help="seed of random backbone weights (and of the heads of 'fit') (default: %(default)s)",
    )
    return parent


def _runtime_options(on_error: str, cache_required: bool = False) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("running")
    group.add_argument(
        "--cache", metavar="DIR", required=cache_required,
        help="embedding cache folder: each picture's vector is computed once per backbone, and kept",
    )
    group.add_argument(
        "--device", help="'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda', 'cuda:1'... (default: auto; "
        "predict and evaluate: the model's)",
    )
    group.add_argument(
        "--batch-size", type=_positive_int, metavar="N",
        help="pictures per forward pass (default: the model's; 64 for a new embedder)",
    )
    group.add_argument(
        "--num-workers", type=_non_negative_int, metavar="N", help="processes that decode pictures (default: 0, in the main one)"
    )
    group.add_argument(
        "--on-error", choices=ON_ERROR, default=on_error,
        help="pictures that do not decode: stop, skip them, or use a blank picture (default: %(default)s)",
    )
    return parent


def _add_command(commands, name: str, help: str, description: str, parents: list) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=help, description=description, parents=[*parents, _output_options()],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_fit(commands) -> None:
    parser = _add_command(
        commands, "fit", "fit a model on labelled pictures and save it",
        """Fit a model on a labelled catalogue and save it with joblib.

TRAIN is a Cdiscount-style .bson file (labels: category_id) or a CSV of image
file names with its image folder (Shopee's filename,category). Except for
--head finetune, the model is Pipeline([("embed", ImageEmbedder), ("head", head)]).

examples:
  skproduct fit train.bson --categories category_names.csv --head hierarchical \\
      --cache ~/emb --out model.joblib
  skproduct fit train.csv --images train_images --head lgbm --out model.joblib""",
        [_data_options(), _backbone_options(), _runtime_options(on_error="raise")],
    )
    parser.add_argument("train", metavar="TRAIN", nargs="+",
                        help="a .bson file (or several, or a quoted glob such as 'train-*.bson'), or a .csv file of "
                             "images")
    parser.add_argument("--out", required=True, metavar="FILE", help="where the model is saved (joblib)")
    parser.add_argument("--categories", metavar="CSV", help="the category tree, as Cdiscount's category_names.csv")
    head = parser.add_argument_group("head")
    head.add_argument(
        "--head", choices=HEADS, default="logistic",
        help="logistic: LogisticRegression; linear: TorchLinearClassifier; lgbm: LGBMClassifier; hierarchical: "
        "HierarchicalClassifier over --categories; finetune: FineTuneClassifier, trains the backbone "
        "(default: %(default)s)",
    )
    head.add_argument(
        "--local-estimator", choices=LOCAL_ESTIMATORS, default="logistic",
        help="with --head hierarchical: the classifier at each node or level (default: %(default)s)",
    )
    head.add_argument(
        "--strategy", choices=STRATEGIES, default="per_level",
        help="with --head hierarchical: one classifier per parent node, per level, or one flat one; tree: one "
        "TreeHeadClassifier (a torch softmax per level, trained jointly; --local-estimator is not used) "
        "(default: %(default)s)",
    )
    head.add_argument(
        "--max-iter", "--epochs", dest="max_iter", type=_positive_int, default=10, metavar="N",
        help="with --head finetune: the most epochs, passes over TRAIN (default: %(default)s)",
    )
    parser.set_defaults(run=run_fit)


def _add_predict(commands) -> None:
    parser = _add_command(
        commands, "predict", "write a Kaggle submission for unlabelled pictures",
        f"""Predict every product of TEST and write a Kaggle submission.

BSON input gives Cdiscount's _id,category_id; CSV input gives Shopee's
filename,category (labels such as "03" stay as they are). One row per product,
in input order, every product: a picture that does not decode is skipped
(--on-error), and a product without a usable picture (with --on-missing drop:
a CSV row whose image file is missing) is predicted from the training prior and
counted in the summary. --top-k K adds category_id_2..K (or category_2..K),
the next most probable classes. --out - writes the submission to stdout.

{TRUSTED_MODELS}

examples:
  skproduct predict model.joblib test.bson --out submission.csv --top-k 3
  skproduct predict model.joblib test.csv --images test_images --out submission.csv""",
        [_data_options(), _runtime_options(on_error="skip")],
    )
    parser.add_argument("model", metavar="MODEL", help="a model saved by 'skproduct fit' (from a trusted source)")
    parser.add_argument("test", metavar="TEST", nargs="+",
                        help="a .bson file (or several, or a quoted glob such as 'test-*.bson'), or a .csv file of "
                             "images")
    parser.add_argument("--out", required=True, metavar="FILE", help="the submission CSV to write ('-': stdout)")
    parser.add_argument(
        "--top-k", type=_positive_int, default=1, metavar="K",
        help="write the K most probable classes per product (default: %(default)s)",
    )
    add_cluster_options(parser, _positive_int)  # --scheduler / --workers (skproduct.distributed)
    parser.set_defaults(run=with_cluster(run_predict))


def _add_extract(commands) -> None:
    parser = _add_command(
        commands, "extract", "embed every picture into the cache (resumable)",
        """Embed every picture of DATA with a backbone into the embedding cache.

Finished vectors are kept as they are computed, so an interrupted run resumes
where it stopped, and a second run computes nothing. Later 'fit', 'predict' and
'evaluate' runs with the same --cache and backbone settings reuse the vectors.

example:
  skproduct extract train.bson --backbone timm:convnext_tiny --cache ~/emb --device cuda""",
        [_data_options(), _backbone_options(), _runtime_options(on_error="skip", cache_required=True)],
    )
    parser.add_argument("data", metavar="DATA", nargs="+",
                        help="a .bson file (or several, or a quoted glob), or a .csv file of images")
    parser.add_argument("--out", metavar="FILE", help="also save the product vectors as a .npy file")
    parser.add_argument(
        "--cache-dtype", choices=("float32", "float16"), default="float32",
        help="how new vectors are stored: float16 takes half the disk (accuracy cost: docs 'Sizing a run'; "
             "default: %(default)s)",
    )
    add_cluster_options(parser, _positive_int)  # --scheduler / --workers (skproduct.distributed)
    parser.set_defaults(run=with_cluster(run_extract))


def _add_evaluate(commands) -> None:
    parser = _add_command(
        commands, "evaluate", "score a model on labelled pictures",
        f"""Score MODEL on the labelled DATA: leaf accuracy, top-k accuracy and, with a
category tree (--categories, or the one the model was fitted with), the accuracy
at every level and the hierarchical F1. --confusion saves the confusion matrix
of the top-level categories (without a tree: of the classes) as an image, in
the format its suffix names (.png, .jpg, .svg, .pdf). --json - writes the
scores to stdout (the table then goes to stderr).

{TRUSTED_MODELS}

example:
  skproduct evaluate model.joblib valid.bson --categories category_names.csv \\
      --confusion confusion.png --json scores.json""",
        [_data_options(), _runtime_options(on_error="skip")],
    )
    parser.add_argument("model", metavar="MODEL", help="a model saved by 'skproduct fit' (from a trusted source)")
    parser.add_argument("data", metavar="DATA", nargs="+",
                        help="a labelled .bson file (or several, or a quoted glob), or a .csv file of images")
    parser.add_argument("--categories", metavar="CSV", help="the category tree, as Cdiscount's category_names.csv")
    parser.add_argument(
        "--top-k", type=_positive_int, default=5, metavar="K", help="k of the top-k accuracy (default: %(default)s)"
    )
    parser.add_argument(
        "--confusion", metavar="IMAGE", help="save the confusion matrix as this .png, .jpg, .svg or .pdf file"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the scores as JSON ('-': stdout)")
    parser.set_defaults(run=run_evaluate)


def _add_demo(commands) -> None:
    parser = _add_command(
        commands, "demo", "fit, save and score a model on a synthetic catalogue (offline)",
        """Run the whole recipe on a synthetic catalogue: no data, no internet, under
a minute on a laptop CPU. Writes a catalogue with a 3-level category tree in
Cdiscount's BSON layout, grid-searches a hierarchical head on cached embeddings
of a tiny random-weight backbone, saves the best model, loads it back and prints
its accuracy at every level next to the chance level.""",
        [],
    )
    parser.add_argument("--workdir", metavar="DIR", help="where files are written (default: a new temporary folder)")
    parser.add_argument(
        "--products", type=_positive_int, default=400, metavar="N", help="catalogue size (default: %(default)s)"
    )
    parser.add_argument("--random-state", type=int, default=0, metavar="SEED", help="seed (default: %(default)s)")
    parser.set_defaults(run=run_demo)
