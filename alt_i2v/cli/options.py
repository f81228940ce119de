"""Every command-line option, declared once: its argparse argument, the actions that take it and the
library keyword it becomes.

:func:`add_options` gives argparse its arguments, :data:`ACTION_OPTIONS` (which options each action
accepts; anything else is a usage error) is derived from the same table, and :func:`keywords` turns the
options an action was given into the keyword arguments of the library function it calls.

Error messages name options by their flag (``--batch-size``), in the library too: a library keyword is
its flag without the dashes (``batch_size``), except where :attr:`Option.keyword` says otherwise, and
tests/test_cli.py checks that every flag a library message names is declared here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..config import RESIZE_MODES

PRED_FORMATS = ("text", "json", "caption")
EXPORT_FORMATS = ("savedmodel", "onnx", "tflite")


def count(least: int) -> Callable[[str], int]:
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


@dataclass(frozen=True)
class Option:
    """One option: ``flags`` and ``argparse`` (what add_argument gets), the ``actions`` that take it, and
    ``keyword``: the library keyword it becomes, the same for every action (a str), per action (a
    mapping; an action missing from it, or None, means its handler reads the option itself), or None
    (every handler reads it itself). ``part`` names a group of keywords that goes to another object than
    the action's main function (``distribution``: train's DistConfig)."""

    flags: tuple[str, ...]
    actions: frozenset[str]
    group: str
    argparse: Mapping[str, Any] = field(default_factory=dict)
    keyword: str | Mapping[str, str | None] | None = "="
    part: str = ""

    @property
    def dest(self) -> str:
        return self.argparse.get("dest") or self.flags[0].lstrip("-").replace("-", "_")

    def keyword_for(self, action: str) -> str | None:
        if isinstance(self.keyword, Mapping):
            return self.keyword.get(action)
        return self.dest if self.keyword == "=" else self.keyword


def _opt(flags: str, actions: str, group: str, *, keyword: Any = "=", part: str = "", **kw: Any) -> Option:
    return Option(tuple(flags.split()), frozenset(actions.split()), group, kw, keyword, part)


TRAIN = "train"
ALL = "scrape import_src vocab build train evaluate pred embed index dedupe similar explain screen export demo serve"
MODEL_USERS = "train evaluate pred embed index dedupe similar explain screen export serve"

OPTIONS: list[Option] = [
    # common
    _opt("--data", "scrape import_src vocab build train evaluate index dedupe", "common", keyword=None, metavar="DIR",
         help="dataset directory (posts.jsonl, images/, vocab.json, store/)"),
    _opt("--model", MODEL_USERS, "common", keyword=None, metavar="DIR", action="append",
         help="model directory: an alt-i2v model, a WD14 tagger folder (model.onnx + selected_tags.csv) "
              "or a DeepDanbooru project (--evaluate takes several)"),
    _opt("--workers", "scrape import_src build train evaluate pred embed index screen", "common",
         keyword={"scrape": "workers", "build": "workers", "train": "workers", "evaluate": "workers"},
         type=count(0), metavar="N",
         help="parallel workers (default: scrape 4, others cores)"),
    _opt("--batch-size", "train evaluate pred embed index screen serve", "common",
         keyword={"train": "batch_size", "evaluate": "batch_size", "serve": "max_batch"}, type=count(1),
         metavar="N", help="batch size (train default 32, predict 64)"),
    _opt("--quiet -q", ALL, "common", keyword=None, action="store_true", help="no progress bars or summaries"),
    _opt("--debug", ALL, "common", keyword=None, action="store_true", help="show tracebacks of failures"),
    # --scrape
    _opt("--query", "scrape", "--scrape", keyword=None, action="append", metavar="TAGS",
         help="tag search, repeatable, worked in order"),
    _opt("--limit", "scrape", "--scrape", type=int, metavar="N", help="stop after N new posts in this run"),
    _opt("--base-url", "scrape", "--scrape", metavar="URL",
         help="Danbooru-compatible server (default danbooru.donmai.us)"),
    _opt("--source", "scrape", "--scrape", choices=["api", "html"], help="JSON API (default) or HTML pages"),
    _opt("--rate", "scrape", "--scrape", type=float, metavar="R", help="requests per second (default 1)"),
    _opt("--file-size", "scrape", "--scrape", choices=["original", "sample"],
         help="original file or the large sample"),
    _opt("--max-bytes", "scrape serve", "--scrape", type=int, metavar="B",
         help="skip files larger than B bytes (--serve: refuse larger uploads with 413, default 32 MiB)"),
    _opt("--login", "scrape", "--scrape", metavar="USER", help="Danbooru login (default $DANBOORU_LOGIN)"),
    _opt("--api-key", "scrape", "--scrape", metavar="KEY", help="Danbooru API key (default $DANBOORU_API_KEY)"),
    # --import
    _opt("--mode", "import_src", "--import", choices=["auto", "folders", "captions"],
         help="folder layout (default auto)"),
    # --vocab
    _opt("--size", "vocab", "--vocab", type=int, metavar="N", help="number of tags (default 4096)"),
    _opt("--min-count", "vocab", "--vocab", type=int, metavar="N", help="least posts per tag (default 1)"),
    _opt("--categories", "vocab", "--vocab", keyword=None, metavar="LIST",
         help="comma-separated: general,character,copyright (default), artist, meta, rating"),
    # --build / --train
    _opt("--image-size", "build train", "--build / --train", type=int, metavar="PX",
         help="square side in pixels (default 150)"),
    _opt("--resize", "build", "--build / --train", choices=list(RESIZE_MODES), help="aspect handling (default pad)"),
    _opt("--max-pixels", "build serve", "--build / --train", type=int, metavar="N",
         help="refuse images with more pixels (bomb guard)"),
    _opt("--rebuild", "build", "--build / --train", action="store_true",
         help="build DATA/store anew beside the old one, then swap it in (refused while it is in use)"),
    _opt("--prune", "build", "--build / --train", action="store_true",
         help="allow removing more than 20%% of the store's records (posts gone from posts.jsonl)"),
    _opt("--shards", "build", "--build / --train", type=int, metavar="N",
         help="write N LevelDB shards, one process each, read by processes (default 1)"),
    _opt("--val-fraction", "build", "--build / --train", type=float, metavar="F",
         help="validation share (default 0.1)"),
    _opt("--test-fraction", "build", "--build / --train", type=float, metavar="F", help="test share (default 0.1)"),
    # --train
    _opt("--epochs", TRAIN, "--train", type=int, metavar="N",
         help="epochs (default 8; the learning-rate schedule spans them)"),
    _opt("--lr", TRAIN, "--train", type=float, metavar="LR",
         help="peak learning rate (default 3e-3 for tiny, else 1e-3)"),
    _opt("--backbone", TRAIN, "--train", metavar="NAME",
         help="vgg16 (default), tiny, or another keras.applications name"),
    _opt("--init-from", TRAIN, "--train", keyword=None, metavar="PROJECT",
         help="start from a DeepDanbooru project's network: its trunk, and the head weights of the tags it knows "
              "(new tags start fresh)"),
    _opt("--weights", TRAIN, "--train", metavar="W", help="imagenet (default for vgg16), none, or a weights file path"),
    _opt("--frozen", TRAIN, "--train", type=int, metavar="N", help="freeze the first N backbone layers (default 12)"),
    _opt("--mixed-precision", TRAIN, "--train", nargs="?", const="auto", metavar="DTYPE",
         help="mixed precision: auto, float16 or bfloat16"),
    _opt("--resume", TRAIN, "--train", action="store_true", help="continue an interrupted run from its last epoch"),
    _opt("--patience", TRAIN, "--train", type=int, metavar="N", help="early-stopping patience in epochs"),
    _opt("--loss", TRAIN, "--train", choices=["bce", "focal", "asl"], help="loss (default bce)"),
    _opt("--optimizer", TRAIN, "--train", choices=["adamw", "adam"], help="optimizer (default adamw)"),
    _opt("--weight-decay", TRAIN, "--train", type=float, metavar="WD", help="AdamW weight decay (default 0.05)"),
    _opt("--schedule", TRAIN, "--train", choices=["cosine", "constant"],
         help="learning rate: warm-up + cosine decay (default) or constant"),
    _opt("--warmup-epochs", TRAIN, "--train", type=float, metavar="N",
         help="warm-up epochs of the cosine schedule (1)"),
    _opt("--label-smoothing", TRAIN, "--train", type=float, metavar="S", help="bce label smoothing (default 0.1)"),
    _opt("--group-loss", TRAIN, "--train", type=float, metavar="W",
         help="weight of a softmax term per group of exclusive tags found in the training labels "
              "(hair colours, eye colours; bce only; 0 turns it off)"),
    _opt("--pooling", TRAIN, "--train", choices=["flatten", "avg", "avgmax"],
         help="head: flatten the feature map, or global average / average+max pooling (default: the backbone's)"),
    _opt("--dropout", TRAIN, "--train", type=float, metavar="P",
         help="dropout before the tags layer (default: the backbone's)"),
    _opt("--trunk", TRAIN, "--train", choices=["resnet", "plain"],
         help="tiny backbone's design: resnet (default; strided stem, residual blocks) or plain "
              "(the original 4-block CNN)"),
    _opt("--stem", TRAIN, "--train", type=int, choices=[0, 1, 2],
         help="tiny resnet: stride-2 convs at its start (fewer keep finer maps for small details)"),
    _opt("--tta", TRAIN, "--train", choices=["flip", "none"],
         help="what the model's predictions average over: flip = each picture and its mirror image (default for "
              "tiny; twice the compute), none = the picture alone (default for the others)"),
    _opt("--distribute", TRAIN, "--train", part="distribution", choices=["auto", "none"],
         help="auto (default): split the global batch over every local device (JAX backend); none: one"),
    _opt("--devices", TRAIN, "--train", part="distribution", type=int, metavar="N",
         help="use N local devices per process (default all)"),
    _opt("--coordinator", TRAIN, "--train", part="distribution", metavar="HOST:PORT",
         help="several processes: process 0's address, the same for all ($ALT_I2V_COORDINATOR)"),
    _opt("--num-processes", TRAIN, "--train", part="distribution", type=int, metavar="P",
         help="processes in the run ($ALT_I2V_NUM_PROCESSES)"),
    _opt("--process-id", TRAIN, "--train", part="distribution", type=int, metavar="I",
         help="this process, 0..P-1 ($ALT_I2V_PROCESS_ID)"),
    _opt("--peer-timeout", TRAIN, "--train", part="distribution", type=float, metavar="S",
         help="stop when another process is silent this long (default 120 s)"),
    # --evaluate
    _opt("--split", "evaluate", "--evaluate", choices=["train", "val", "test"], help="split to score (default test)"),
    # --pred / --embed / --index / --similar
    _opt("--threshold", "pred screen", "--pred / --embed / --index / --similar", keyword=None, metavar="T",
         help="float, 'mcut', or per category 'general=0.4,character=mcut' (default: calibrated; "
              "WD14 general 0.35 character 0.85; DeepDanbooru 0.5)"),
    _opt("--top-k", "pred similar explain serve", "--pred / --embed / --index / --similar",
         keyword={"serve": "top_k"}, type=int, metavar="K", help="at most K tags / neighbours"),
    _opt("--format", "pred export", "--pred / --embed / --index / --similar", keyword=None,
         choices=[*PRED_FORMATS, *EXPORT_FORMATS],
         help="--pred: text (default), json or caption; --export: savedmodel, onnx or tflite"),
    _opt("--write-captions", "pred", "--pred / --embed / --index / --similar", keyword=None, action="store_true",
         help="write <image>.txt beside each image"),
    _opt("--caption-mode", "pred", "--pred / --embed / --index / --similar", keyword=None,
         choices=["append", "skip", "overwrite"],
         help="existing caption files: skip the image (default), append new tags, or overwrite"),
    _opt("--recursive -r", "pred embed index explain", "--pred / --embed / --index / --similar", keyword=None,
         action="store_true", help="descend into sub-folders"),
    _opt("--exclude", "pred", "--pred / --embed / --index / --similar", keyword=None, action="append",
         metavar="TAGS", help="tags never written (comma-separated)"),
    _opt("--max-tags", "pred", "--pred / --embed / --index / --similar", keyword=None, type=int, metavar="N",
         help="at most N tags per caption"),
    _opt("--tag-style", "pred", "--pred / --embed / --index / --similar", keyword=None,
         choices=["underscores", "spaces"], help="caption tag style (default spaces)"),
    _opt("--no-escape", "pred", "--pred / --embed / --index / --similar", keyword=None, action="store_true",
         help="do not escape parentheses in captions"),
    _opt("--out", "evaluate embed index explain screen export", "--pred / --embed / --index / --similar",
         keyword=None, metavar="PATH",
         help="output: .npy file (--embed), index path (--index), folder (--explain, --screen, --export, "
              "--evaluate of a ready model or several models)"),
    _opt("--images", "index", "--pred / --embed / --index / --similar", keyword=None, metavar="DIR",
         help="--index: an image folder instead of --data"),
    _opt("--approx", "index", "--pred / --embed / --index / --similar", keyword=None, action="store_true",
         help="--index: also build an approximate (faiss) index"),
    _opt("--index-type", "index", "--pred / --embed / --index / --similar", keyword=None,
         choices=["auto", "exact", "ivf-sq8", "ivf-pq"],
         help="--index: exact (vectors in memory), ivf-sq8 (+ 8-bit codes), ivf-pq (PQ codes in memory, "
              "vectors on disk; millions of images), or auto by size (default)"),
    _opt("--add", "index", "--pred / --embed / --index / --similar", keyword=None, action="store_true",
         help="--index: add the images --data/--images has that the index at --out lacks (no rebuild)"),
    _opt("--remove", "index", "--pred / --embed / --index / --similar", keyword=None, metavar="IDS",
         help="--index: remove these ids (comma-separated) from the index at --out"),
    _opt("--min-cosine", "dedupe", "--dedupe", keyword=None, type=float, metavar="C",
         help="--dedupe: cosine at which two pictures are copies (default 0.87 without a model, 0.95 with)"),
    # --index INDEX of --similar and --serve: the same flag as the --index action, so argparse sees it as
    # --index-path (see alt_i2v.cli.parse); hidden from --help, which shows --index once.
    _opt("--index-path", "similar serve", "--pred / --embed / --index / --similar", keyword=None, dest="index",
         metavar="INDEX", help=argparse.SUPPRESS),
    # --explain
    _opt("--tag", "explain", "--explain", keyword=None, action="append", metavar="TAGS",
         help="tags to explain, repeatable or comma-separated (default: the --top-k most probable, 3)"),
    # --screen
    _opt("--keep", "screen", "--screen", keyword=None, action="append", metavar="TAGS",
         help="ok needs one of these tags (comma-separated)"),
    _opt("--reject", "screen", "--screen", keyword=None, action="append", metavar="TAGS",
         help="any of these tags makes an image ng"),
    _opt("--copy", "screen", "--screen", keyword=None, action="store_true", help="copy into OUT (default)"),
    _opt("--move", "screen", "--screen", keyword=None, action="store_true",
         help="move into OUT: copy, fsync, verify, then remove"),
    _opt("--dry-run", "screen", "--screen", keyword=None, action="store_true",
         help="write only OUT/screen_report.csv"),
    # --demo
    _opt("--quick", "demo", "--demo", keyword=None, action="store_true", help="a sub-minute version"),
    # --serve
    _opt("--host", "serve", "--serve (also --model, --index INDEX, --top-k, --max-bytes, --max-pixels)",
         metavar="HOST", help="address to listen on (default 127.0.0.1: this machine only)"),
    _opt("--port", "serve", "--serve (also --model, --index INDEX, --top-k, --max-bytes, --max-pixels)",
         type=int, metavar="PORT", help="port to listen on (default 8000; 0 picks a free one)"),
]
EXCLUSIVE = ({"copy", "move"},)  # at most one of each set (argparse mutually exclusive groups)

ACTION_OPTIONS: dict[str, set[str]] = {}
for _o in OPTIONS:
    for _a in _o.actions:
        ACTION_OPTIONS.setdefault(_a, set()).add(_o.dest)


def add_options(parser: argparse.ArgumentParser) -> None:
    """Every option of :data:`OPTIONS` on ``parser``, in groups by the actions they belong to."""
    groups: dict[str, Any] = {}
    exclusive: dict[frozenset, Any] = {}
    for o in OPTIONS:
        if o.group not in groups:
            groups[o.group] = parser.add_argument_group(o.group)
        target = groups[o.group]
        for names in EXCLUSIVE:
            if o.dest in names:
                key = frozenset(names)
                if key not in exclusive:
                    exclusive[key] = target.add_mutually_exclusive_group()
                target = exclusive[key]
        target.add_argument(*o.flags, **o.argparse)


def keywords(args: argparse.Namespace, action: str, *, part: str = "") -> dict[str, Any]:
    """The library keyword arguments ``action`` gets from the options given (``part``: a sub-group)."""
    out = {}
    for o in OPTIONS:
        name = o.keyword_for(action) if action in o.actions and o.part == part else None
        value = getattr(args, o.dest, None)
        if name and value is not None and value is not False:
            out[name] = value
    return out


def flag(dest: str) -> str:
    """The flag of an option's dest (``batch_size`` -> ``--batch-size``)."""
    for o in OPTIONS:
        if o.dest == dest:
            return o.flags[0]
    return "--" + dest.replace("_", "-")


__all__ = ["OPTIONS", "Option", "ACTION_OPTIONS", "add_options", "keywords", "flag", "count",
           "PRED_FORMATS", "EXPORT_FORMATS"]
