"""Command line: one action flag per call, options after it; a thin layer over the library.

All argument handling lives in this package (the library takes plain parameters): the parser and the
data-stage handlers here, the handlers of a trained model in :mod:`.infer`.

Nothing heavy is imported here: each handler imports its stage when it runs, so ``--help`` is instant.
Exit codes: 0 ok, 1 failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import tempfile
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from .. import __version__
from ..errors import AltI2VError, UsageError
from ..data.layout import DataDir
from .infer import EXPORT_FORMATS, PRED_FORMATS, cmd_embed, cmd_explain, cmd_export, cmd_index, cmd_pred, \
    cmd_screen, cmd_similar

ACTIONS: dict[str, tuple[str, str]] = {
    # dest: (help, example)
    "scrape": ("collect posts and images from Danbooru (JSON API, HTML fallback)",
               'alt-i2v --scrape --data data --query "kantai_collection 1girl" --limit 1000'),
    "import_src": ("turn a folder into a dataset (class sub-folders, or images + .txt captions)",
                   "alt-i2v --import ~/pictures/labelled --data data --mode folders"),
    "vocab": ("build the tag vocabulary DATA/vocab.json (alias --maeshori)",
              "alt-i2v --vocab --data data --size 4096 --min-count 5"),
    "build": ("decode, resize and store images in DATA/store (LevelDB)",
              "alt-i2v --build --data data --image-size 150 --resize pad"),
    "train": ("train a tagger into a model directory",
              "alt-i2v --train --data data --model model --epochs 20 --weights imagenet"),
    "evaluate": ("score a model on a split (MODEL/reports/); several --model: one comparison report",
                 "alt-i2v --evaluate --data data --model model --model wd14-folder/ --split test"),
    "pred": ("tag images or folders",
             "alt-i2v --pred img.jpg folder/ --model model --format json"),
    "embed": ("write L2-normalised embeddings of images to a .npy file",
              "alt-i2v --embed folder/ --model model --out emb.npy"),
    "index": ("build a similar-image index from a dataset or an image folder",
              "alt-i2v --index --model model --images folder/ --out folder.index"),
    "dedupe": ("find groups of near-copies in a dataset (DATA/reports/dedupe.json); --build keeps each "
               "group in one split",
               "alt-i2v --dedupe --data data [--model model]"),
    "similar": ("print the nearest images to one image",
                "alt-i2v --similar query.jpg --index folder.index --top-k 10"),
    "explain": ("write Grad-CAM heat maps: where in each image the evidence for a tag lies",
                "alt-i2v --explain img.jpg folder/ --model model --tag blonde_hair,hat --out maps/"),
    "screen": ("sort a folder into OUT/ok and OUT/ng by tags (resumable; a move never loses a file)",
               'alt-i2v --screen raw/ --model model --keep "1girl,solo" --reject lowres --out sorted/ --move'),
    "export": ("write the model as SavedModel, ONNX or TFLite (+ vocabulary, thresholds), parity-checked",
               "alt-i2v --export --model model --format onnx --out model-onnx/"),
    "demo": ("run the whole pipeline on generated data (offline)",
             "alt-i2v --demo demo_run --quick"),
    "serve": ("a web page and JSON API: drop an image, see its tags, why, and similar images",
              "alt-i2v --serve --model model --index folder.index --port 8000"),
}

# Options each action accepts (besides --quiet/--debug); anything else given is a usage error.
ACTION_OPTIONS: dict[str, set[str]] = {
    "scrape": {"data", "query", "limit", "base_url", "source", "rate", "workers", "file_size", "max_bytes",
               "login", "api_key"},
    "import_src": {"data", "mode", "workers"},
    "vocab": {"data", "size", "min_count", "categories"},
    "build": {"data", "image_size", "resize", "workers", "max_pixels", "rebuild", "prune", "shards",
              "val_fraction",
              "test_fraction"},
    "train": {"data", "model", "epochs", "batch_size", "lr", "backbone", "weights", "frozen", "image_size",
              "mixed_precision", "resume", "patience", "loss", "workers", "optimizer", "weight_decay",
              "schedule", "warmup_epochs", "label_smoothing", "group_loss", "pooling", "dropout", "trunk", "stem",
              "distribute", "devices", "init_from",
              "coordinator", "num_processes", "process_id", "peer_timeout", "record_log"},
    "evaluate": {"data", "model", "split", "batch_size", "out", "workers"},
    "pred": {"model", "threshold", "top_k", "format", "write_captions", "caption_mode", "recursive",
             "exclude", "max_tags", "tag_style", "no_escape", "batch_size", "workers"},
    "embed": {"model", "out", "recursive", "batch_size", "workers"},
    "index": {"model", "data", "images", "out", "recursive", "approx", "index_type", "add", "remove", "batch_size",
              "workers"},
    "dedupe": {"data", "model", "min_cosine"},
    "similar": {"index", "top_k", "model"},
    "explain": {"model", "tag", "top_k", "out", "recursive"},
    "screen": {"model", "keep", "reject", "threshold", "out", "copy", "move", "dry_run", "batch_size", "workers"},
    "export": {"model", "format", "out"},
    "demo": {"quick"},
    "serve": {"model", "index", "host", "port", "max_bytes", "max_pixels", "top_k", "batch_size"},
}
COMMON = {"quiet", "debug"}
# Actions that load Keras (and, with the default backend, TensorFlow)
KERAS_ACTIONS = {"train", "evaluate", "pred", "embed", "index", "similar", "explain", "screen", "export", "demo",
                 "serve"}


def _count(least: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``least`` (anything else is a usage error, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def build_parser() -> argparse.ArgumentParser:
    lines = [f"  --{a.replace('_src', '').replace('_', '-'):9s} {h}\n  {'':9s}   e.g. {ex}"
             for a, (h, ex) in ACTIONS.items()]
    p = argparse.ArgumentParser(
        prog="alt-i2v",
        description="Learn to tag anime-style illustrations with many labels at once.",
        epilog="actions (exactly one per call):\n" + "\n".join(lines) +
               "\n\nexit codes: 0 ok, 1 failed, 2 usage error",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"alt-i2v {__version__}")
    act = p.add_argument_group("actions").add_mutually_exclusive_group(required=True)
    act.add_argument("--scrape", action="store_true", help=ACTIONS["scrape"][0])
    act.add_argument("--import", dest="import_src", metavar="SRC", help=ACTIONS["import_src"][0])
    act.add_argument("--vocab", "--maeshori", dest="vocab", action="store_true", help=ACTIONS["vocab"][0])
    act.add_argument("--build", action="store_true", help=ACTIONS["build"][0])
    act.add_argument("--train", action="store_true", help=ACTIONS["train"][0])
    act.add_argument("--evaluate", action="store_true", help=ACTIONS["evaluate"][0])
    act.add_argument("--pred", nargs="+", metavar="FILE_OR_DIR", help=ACTIONS["pred"][0])
    act.add_argument("--embed", nargs="+", metavar="FILE_OR_DIR", help=ACTIONS["embed"][0])
    act.add_argument("--index", dest="index_action", action="store_true", help=ACTIONS["index"][0])
    act.add_argument("--dedupe", action="store_true", help=ACTIONS["dedupe"][0])
    act.add_argument("--similar", metavar="FILE", help=ACTIONS["similar"][0])
    act.add_argument("--explain", nargs="+", metavar="FILE_OR_DIR", help=ACTIONS["explain"][0])
    act.add_argument("--screen", metavar="SRC", help=ACTIONS["screen"][0])
    act.add_argument("--export", action="store_true", help=ACTIONS["export"][0])
    act.add_argument("--demo", nargs="?", const="alt-i2v-demo", metavar="DIR", help=ACTIONS["demo"][0] +
                     " (default DIR: ./alt-i2v-demo)")
    act.add_argument("--serve", action="store_true", help=ACTIONS["serve"][0])

    g = p.add_argument_group("common")
    g.add_argument("--data", metavar="DIR", help="dataset directory (posts.jsonl, images/, vocab.json, store/)")
    g.add_argument("--model", metavar="DIR", action="append",
                   help="model directory: an alt-i2v model, a WD14 tagger folder (model.onnx + selected_tags.csv) "
                        "or a DeepDanbooru project (--evaluate takes several)")
    g.add_argument("--workers", type=_count(0), metavar="N",
                   help="parallel workers (default: scrape 4, others cores)")
    g.add_argument("--batch-size", type=_count(1), metavar="N", help="batch size (train default 32, predict 64)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summaries")
    g.add_argument("--debug", action="store_true", help="show tracebacks of failures")

    g = p.add_argument_group("--scrape")
    g.add_argument("--query", action="append", metavar="TAGS", help="tag search, repeatable, worked in order")
    g.add_argument("--limit", type=int, metavar="N", help="stop after N new posts in this run")
    g.add_argument("--base-url", metavar="URL", help="Danbooru-compatible server (default danbooru.donmai.us)")
    g.add_argument("--source", choices=["api", "html"], help="JSON API (default) or HTML pages")
    g.add_argument("--rate", type=float, metavar="R", help="requests per second (default 1)")
    g.add_argument("--file-size", choices=["original", "sample"], help="original file or the large sample")
    g.add_argument("--max-bytes", type=int, metavar="B",
                   help="skip files larger than B bytes (--serve: refuse larger uploads with 413, default 32 MiB)")
    g.add_argument("--login", metavar="USER", help="Danbooru login (default $DANBOORU_LOGIN)")
    g.add_argument("--api-key", metavar="KEY", help="Danbooru API key (default $DANBOORU_API_KEY)")

    g = p.add_argument_group("--import")
    g.add_argument("--mode", choices=["auto", "folders", "captions"], help="folder layout (default auto)")

    g = p.add_argument_group("--vocab")
    g.add_argument("--size", type=int, metavar="N", help="number of tags (default 4096)")
    g.add_argument("--min-count", type=int, metavar="N", help="least posts per tag (default 1)")
    g.add_argument("--categories", metavar="LIST",
                   help="comma-separated: general,character,copyright (default), artist, meta, rating")

    g = p.add_argument_group("--build / --train")
    g.add_argument("--image-size", type=int, metavar="PX", help="square side in pixels (default 150)")
    g.add_argument("--resize", choices=["pad", "stretch", "crop"], help="aspect handling (default pad)")
    g.add_argument("--max-pixels", type=int, metavar="N", help="refuse images with more pixels (bomb guard)")
    g.add_argument("--rebuild", action="store_true",
                   help="build DATA/store anew beside the old one, then swap it in (refused while it is in use)")
    g.add_argument("--prune", action="store_true",
                   help="allow removing more than 20%% of the store's records (posts gone from posts.jsonl)")
    g.add_argument("--shards", type=int, metavar="N",
                   help="write N LevelDB shards, one process each, read by processes (default 1)")
    g.add_argument("--val-fraction", type=float, metavar="F", help="validation share (default 0.1)")
    g.add_argument("--test-fraction", type=float, metavar="F", help="test share (default 0.1)")

    g = p.add_argument_group("--train")
    g.add_argument("--epochs", type=int, metavar="N", help="epochs (default 8; the learning-rate schedule spans them)")
    g.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (default 3e-3 for tiny, else 1e-3)")
    g.add_argument("--backbone", metavar="NAME", help="vgg16 (default), tiny, or another keras.applications name")
    g.add_argument("--init-from", metavar="PROJECT",
                   help="start from a DeepDanbooru project's network: its trunk, and the head weights of the tags "
                        "it knows (new tags start fresh)")
    g.add_argument("--weights", metavar="W", help="imagenet (default for vgg16), none, or a weights file path")
    g.add_argument("--frozen", type=int, metavar="N", help="freeze the first N backbone layers (default 12)")
    g.add_argument("--mixed-precision", nargs="?", const="auto", metavar="DTYPE",
                   help="mixed precision: auto, float16 or bfloat16")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    g.add_argument("--patience", type=int, metavar="N", help="early-stopping patience in epochs")
    g.add_argument("--loss", choices=["bce", "focal", "asl"], help="loss (default bce)")
    g.add_argument("--optimizer", choices=["adamw", "adam"], help="optimizer (default adamw)")
    g.add_argument("--weight-decay", type=float, metavar="WD", help="AdamW weight decay (default 0.05)")
    g.add_argument("--schedule", choices=["cosine", "constant"],
                   help="learning rate: warm-up + cosine decay (default) or constant")
    g.add_argument("--warmup-epochs", type=float, metavar="N", help="warm-up epochs of the cosine schedule (1)")
    g.add_argument("--label-smoothing", type=float, metavar="S", help="bce label smoothing (default 0.1)")
    g.add_argument("--group-loss", type=float, metavar="W",
                   help="weight of a softmax term per group of exclusive tags found in the training labels "
                        "(hair colours, eye colours; bce only; 0 turns it off)")
    g.add_argument("--pooling", choices=["flatten", "avg", "avgmax"],
                   help="head: flatten the feature map, or global average / average+max pooling "
                        "(default: the backbone's)")
    g.add_argument("--dropout", type=float, metavar="P", help="dropout before the tags layer (default: the backbone's)")
    g.add_argument("--trunk", choices=["resnet", "plain"],
                   help="tiny backbone's design: resnet (default; strided stem, residual blocks) or plain "
                        "(the original 4-block CNN)")
    g.add_argument("--stem", type=int, choices=[0, 1, 2],
                   help="tiny resnet: stride-2 convs at its start (fewer keep finer maps for small details)")
    g.add_argument("--distribute", choices=["auto", "none"],
                   help="auto (default): split the global batch over every local device (JAX backend); none: one")
    g.add_argument("--devices", type=int, metavar="N", help="use N local devices per process (default all)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="several processes: process 0's address, the same for all ($ALT_I2V_COORDINATOR)")
    g.add_argument("--num-processes", type=int, metavar="P", help="processes in the run ($ALT_I2V_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..P-1 ($ALT_I2V_PROCESS_ID)")
    g.add_argument("--peer-timeout", type=float, metavar="S",
                   help="stop when another process is silent this long (default 120 s)")
    g.add_argument("--record-log", metavar="DIR", help=argparse.SUPPRESS)  # tests: which records each process fed

    g = p.add_argument_group("--evaluate")
    g.add_argument("--split", choices=["train", "val", "test"], help="split to score (default test)")

    g = p.add_argument_group("--pred / --embed / --index / --similar")
    g.add_argument("--threshold", metavar="T",
                   help="float, 'mcut', or per category 'general=0.4,character=mcut' (default: calibrated; "
                        "WD14 general 0.35 character 0.85; DeepDanbooru 0.5)")
    g.add_argument("--top-k", type=int, metavar="K", help="at most K tags / neighbours")
    g.add_argument("--format", choices=[*PRED_FORMATS, *EXPORT_FORMATS],
                   help="--pred: text (default), json or caption; --export: savedmodel, onnx or tflite")
    g.add_argument("--write-captions", action="store_true", help="write <image>.txt beside each image")
    g.add_argument("--caption-mode", choices=["append", "skip", "overwrite"],
                   help="existing caption files: skip the image (default), append new tags, or overwrite")
    g.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    g.add_argument("--exclude", action="append", metavar="TAGS", help="tags never written (comma-separated)")
    g.add_argument("--max-tags", type=int, metavar="N", help="at most N tags per caption")
    g.add_argument("--tag-style", choices=["underscores", "spaces"], help="caption tag style (default spaces)")
    g.add_argument("--no-escape", action="store_true", help="do not escape parentheses in captions")
    g.add_argument("--out", metavar="PATH",
                   help="output: .npy file (--embed), index path (--index), folder (--explain, --screen, --export, "
                        "--evaluate of a ready model or several models)")
    g.add_argument("--images", metavar="DIR", help="--index: an image folder instead of --data")
    g.add_argument("--approx", action="store_true", help="--index: also build an approximate (faiss) index")
    g.add_argument("--index-type", choices=["auto", "exact", "ivf-sq8", "ivf-pq"],
                   help="--index: exact (vectors in memory), ivf-sq8 (+ 8-bit codes), ivf-pq (PQ codes in memory, "
                        "vectors on disk; millions of images), or auto by size (default)")
    g.add_argument("--add", action="store_true",
                   help="--index: add the images --data/--images has that the index at --out lacks (no rebuild)")
    g.add_argument("--remove", metavar="IDS", help="--index: remove these ids (comma-separated) from the index at --out")
    g.add_argument("--min-cosine", type=float, metavar="C",
                   help="--dedupe: cosine at which two pictures are copies (default 0.87 without a model, 0.95 with)")
    g.add_argument("--index-path", dest="index", metavar="INDEX", help=argparse.SUPPRESS)

    g = p.add_argument_group("--explain")
    g.add_argument("--tag", action="append", metavar="TAGS",
                   help="tags to explain, repeatable or comma-separated (default: the --top-k most probable, 3)")

    g = p.add_argument_group("--screen")
    g.add_argument("--keep", action="append", metavar="TAGS", help="ok needs one of these tags (comma-separated)")
    g.add_argument("--reject", action="append", metavar="TAGS", help="any of these tags makes an image ng")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--copy", action="store_true", help="copy into OUT (default)")
    how.add_argument("--move", action="store_true", help="move into OUT: copy, fsync, verify, then remove")
    g.add_argument("--dry-run", action="store_true", help="write only OUT/screen_report.csv")

    g = p.add_argument_group("--demo")
    g.add_argument("--quick", action="store_true", help="a sub-minute version")

    g = p.add_argument_group("--serve (also --model, --index INDEX, --top-k, --max-bytes, --max-pixels)")
    g.add_argument("--host", metavar="HOST", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, metavar="PORT", help="port to listen on (default 8000; 0 picks a free one)")
    return p


def _parse(argv: Sequence[str] | None) -> tuple[str, argparse.Namespace]:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # --index is both an action flag and the --similar/--serve option; disambiguate before argparse sees it.
    if ("--similar" in argv or "--serve" in argv) and "--index" in argv:
        argv[argv.index("--index")] = "--index-path"
    args = parser.parse_args(argv)
    action = next(a for a in ACTIONS if _given(getattr(args, "index_action" if a == "index" else a, None)))
    allowed = ACTION_OPTIONS[action] | COMMON
    for dest, value in vars(args).items():
        if dest in ACTIONS or dest in ("index_action",) or dest in allowed:
            continue
        if _given(value):
            flag = "--" + dest.replace("_", "-")
            parser.error(f"{flag} does not apply to --{action.replace('_src', '')}")
    models = args.model or []  # --model is repeatable for --evaluate only; elsewhere it is one directory
    if len(models) > 1 and action != "evaluate":
        parser.error(f"--model is given once for --{action.replace('_src', '')} (only --evaluate compares several)")
    args.model = models[0] if models else None
    args.models = models
    return action, args


def quiet_frameworks(*, load_keras: bool) -> None:
    """Keep the frameworks' start-up chatter off stderr (``--debug`` skips this and shows it all).

    ``TF_CPP_MIN_LOG_LEVEL=3``, set before TensorFlow is imported, hides its C++ log lines (cuInit and
    CUDA errors on machines without a GPU, CPU-feature notes) and Python-side loggers are set to ERROR
    (TensorFlow's tf.function retracing notes, absl and JAX warnings). TensorFlow 2.19+ also logs while
    its shared libraries load (oneDNN, "Could not find cuda drivers", absl's InitializeLog notice), before
    it reads any setting (tensorflow/tensorflow#100442), so Keras is imported here with stderr's file
    descriptor pointed at a temporary file; if that import fails, what was written is shown.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("tensorflow", "absl", "jax"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if load_keras and "keras" not in sys.modules:
        with _stderr_held():
            import keras  # noqa: F401


@contextmanager
def _stderr_held() -> Iterator[None]:
    """Point file descriptor 2 at a temporary file for the block; replay it if the block raises."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr descriptor: nothing to hold
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _given(value: Any) -> bool:
    return value is not None and value is not False


def _opt(args: argparse.Namespace, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def _need(args: argparse.Namespace, name: str, action: str) -> str:
    value = getattr(args, name, None)
    if not value:
        raise UsageError(f"--{action} needs --{name.replace('_', '-')}")
    return value


# ---------------------------------------------------------------------------------------------------------
# Handlers: one per action, each calls one library function and prints its summary.


def cmd_scrape(args: argparse.Namespace) -> int:
    data = _need(args, "data", "scrape")
    if not args.query:
        raise UsageError("--scrape needs at least one --query")
    from ..progress import summary
    from ..scraper import scrape

    kw = {k: getattr(args, k) for k in ("limit", "base_url", "source", "rate", "workers", "file_size",
                                         "max_bytes", "login", "api_key") if getattr(args, k) is not None}
    result = scrape(data, args.query, quiet=args.quiet, **kw)
    summary("scrape", result.summary(), quiet=args.quiet)
    return 0


def cmd_import_src(args: argparse.Namespace) -> int:
    from ..config import resolve_workers
    from ..data.posts import import_folder
    from ..progress import summary

    data = _need(args, "data", "import")
    result = import_folder(args.import_src, data, mode=_opt(args, "mode", "auto"),
                           workers=resolve_workers(args.workers) * 2, quiet=args.quiet)
    summary("import", {**result.summary(), "report": str(DataDir(data).report("import_report"))},
            quiet=args.quiet)
    return 0


def cmd_vocab(args: argparse.Namespace) -> int:
    from ..config import DEFAULT_CATEGORIES
    from ..progress import summary
    from ..data.vocab import build_vocab

    data = _need(args, "data", "vocab")
    cats = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else DEFAULT_CATEGORIES
    vocab = build_vocab(data, size=_opt(args, "size", 4096), min_count=_opt(args, "min_count", 1), categories=cats)
    top = ", ".join(f"{t['name']} ({t['count']})" for t in vocab.tags[:8])
    summary("vocab", {"tags": len(vocab), "from posts": vocab.built_from, "categories": ",".join(vocab.categories),
                      "most common": top or "-", "written": str(DataDir(data).vocab)}, quiet=args.quiet)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from ..progress import summary
    from ..store import build_store

    data = _need(args, "data", "build")
    kw = {k: getattr(args, k) for k in ("image_size", "resize", "workers", "max_pixels", "val_fraction",
                                         "test_fraction", "shards") if getattr(args, k) is not None}
    result = build_store(data, rebuild=args.rebuild, prune=args.prune, quiet=args.quiet, **kw)
    summary("build", {**result.summary(), "report": str(DataDir(data).report("build_report"))},
            quiet=args.quiet)
    return 0


def cmd_dedupe(args: argparse.Namespace) -> int:
    """``--dedupe --data DATA [--model M] [--min-cosine C]``: DATA/reports/dedupe.json + contact sheets."""
    from ..progress import summary
    from ..search.dedupe import REPORT, SHEETS_DIR, find_groups, write_report

    data = _need(args, "data", "dedupe")
    report = find_groups(data, model=args.model, min_cosine=args.min_cosine, quiet=args.quiet)
    path = write_report(data, report)
    for bad in report["unreadable"]:
        print(f"alt-i2v: skipped {bad['error']}", file=sys.stderr)
    summary("dedupe", {"report": str(path), "sheets": str(DataDir(data).reports / SHEETS_DIR),
                       "method": report["method"], "thresholds": report["thresholds"], "posts": report["posts"],
                       "groups": len(report["groups"]), "posts in groups": report["grouped_posts"],
                       "parent links": report["parent_links"], "unreadable": len(report["unreadable"]),
                       "next": f"--build keeps each group in one split (it reads {REPORT}.json)"},
            quiet=args.quiet)
    return 1 if report["unreadable"] else 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..progress import summary
    from ..training.run import train

    data = _need(args, "data", "train")
    model = _need(args, "model", "train")
    kw = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "backbone", "weights", "frozen",
                                         "image_size", "mixed_precision", "patience", "loss", "workers",
                                         "optimizer", "weight_decay", "schedule", "warmup_epochs",
                                         "label_smoothing", "group_loss", "pooling", "dropout", "trunk",
                                         "stem")
          if getattr(args, k) is not None}
    if args.init_from:
        if args.backbone or args.weights:
            raise UsageError("--init-from PROJECT is the starting network: leave --backbone and --weights out")
        kw.update(backbone="deepdanbooru", weights=args.init_from)
    result = train(data, model, resume=args.resume, quiet=args.quiet, distribution=_dist_config(args), **kw)
    summary("train", result.summary(), quiet=args.quiet or result.process != 0)
    return 0


def _dist_config(args: argparse.Namespace) -> Any:
    """--distribute/--devices/--coordinator/... over the cluster launcher's environment variables."""
    from ..training.distribute import DistConfig, settings_from_env

    kw = settings_from_env(os.environ)
    kw.update({k: getattr(args, k) for k in ("distribute", "devices", "coordinator", "num_processes",
                                             "process_id", "peer_timeout", "record_log")
               if getattr(args, k) is not None})
    return DistConfig(**kw)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..progress import summary
    from ..ready import ALT_I2V, detect
    from ..training.evaluation import evaluate

    data = _need(args, "data", "evaluate")
    models = args.models or [_need(args, "model", "evaluate")]
    if len(models) > 1 or args.out or any(detect(m) != ALT_I2V for m in models):
        from ..training.compare import compare

        result = compare(data, models, split=_opt(args, "split", "test"), out=args.out, quiet=args.quiet,
                         batch_size=args.batch_size, workers=args.workers)
        summary("evaluate" if len(models) == 1 else "compare", result.summary(), quiet=args.quiet)
        return 1 if result.failed else 0
    result = evaluate(_need(args, "data", "evaluate"), _need(args, "model", "evaluate"),
                      split=_opt(args, "split", "test"), batch_size=args.batch_size, quiet=args.quiet)
    summary("evaluate", result.summary(), quiet=args.quiet)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.demo, quick=args.quick, quiet=args.quiet)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ..config import ServeConfig
    from ..serve import require_extra, run_server

    require_extra()
    if not args.model and not args.index:
        raise UsageError("--serve needs --model DIR (a trained model directory), or an --index that names its model")
    kw = {"host": args.host, "port": args.port, "max_bytes": args.max_bytes, "max_pixels": args.max_pixels,
          "top_k": args.top_k, "max_batch": args.batch_size}
    config = ServeConfig(**{k: v for k, v in kw.items() if v is not None})
    run_server(args.model, args.index, config, quiet=args.quiet)
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "scrape": cmd_scrape, "import_src": cmd_import_src, "vocab": cmd_vocab, "build": cmd_build,
    "train": cmd_train, "evaluate": cmd_evaluate, "pred": cmd_pred, "embed": cmd_embed, "index": cmd_index, "dedupe": cmd_dedupe,
    "similar": cmd_similar, "explain": cmd_explain, "screen": cmd_screen, "export": cmd_export,
    "demo": cmd_demo, "serve": cmd_serve,
}


def _again(action: str) -> str:
    """How to pick up an interrupted command: training continues only with --resume."""
    return "run the same command again with --resume" if action == "train" else "run the same command again"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m alt_i2v`` and ``alt-i2v``; returns the exit code."""
    try:
        action, args = _parse(argv)
    except SystemExit as e:  # argparse: --help/--version exit 0, errors exit 2
        return int(e.code or 0) if isinstance(e.code, int) else 2
    try:
        if not args.debug:
            quiet_frameworks(load_keras=action in KERAS_ACTIONS)
        return int(HANDLERS[action](args) or 0)
    except UsageError as e:
        print(f"alt-i2v: usage error: {e}", file=sys.stderr)
        return 2
    except AltI2VError as e:
        if args.debug:
            raise
        print(f"alt-i2v: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if args.debug:
            raise
        hint = (f" (the disk is full: free space and {_again(action)}; finished work is kept)"
                if e.errno == errno.ENOSPC else "")
        print(f"alt-i2v: error: {e}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"alt-i2v: interrupted; finished work is kept, {_again(action)} to resume", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - last resort: a clear line, the traceback only on --debug
        if args.debug:
            raise
        print(f"alt-i2v: error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
