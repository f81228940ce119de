"""Command line: one action flag per call, options after it; a thin layer over the library.

All argument handling lives in this package (the library takes plain parameters): every option is
declared once in :mod:`.options`, the parser and the data-stage handlers are here, the handlers of a
trained model in :mod:`.infer`.

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
from .infer import cmd_embed, cmd_explain, cmd_export, cmd_index, cmd_pred, cmd_screen, cmd_similar
from .options import ACTION_OPTIONS, add_options, keywords

ACTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any], str, str]] = {
    # dest: (flags, add_argument's other arguments, help, example); exactly one action per call
    "scrape": (("--scrape",), {"action": "store_true"},
               "collect posts and images from Danbooru (JSON API, HTML fallback)",
               'alt-i2v --scrape --data data --query "kantai_collection 1girl" --limit 1000'),
    "import_src": (("--import",), {"metavar": "SRC"},
                   "turn a folder into a dataset (class sub-folders, or images + .txt captions)",
                   "alt-i2v --import ~/pictures/labelled --data data --mode folders"),
    "vocab": (("--vocab", "--maeshori"), {"action": "store_true"},
              "build the tag vocabulary DATA/vocab.json (alias --maeshori)",
              "alt-i2v --vocab --data data --size 4096 --min-count 5"),
    "build": (("--build",), {"action": "store_true"},
              "decode, resize and store images in DATA/store (LevelDB)",
              "alt-i2v --build --data data --image-size 150 --resize pad"),
    "train": (("--train",), {"action": "store_true"},
              "train a tagger into a model directory",
              "alt-i2v --train --data data --model model --epochs 20 --weights imagenet"),
    "evaluate": (("--evaluate",), {"action": "store_true"},
                 "score a model on a split (MODEL/reports/); several --model: one comparison report",
                 "alt-i2v --evaluate --data data --model model --model wd14-folder/ --split test"),
    "pred": (("--pred",), {"nargs": "+", "metavar": "FILE_OR_DIR"},
             "tag images or folders",
             "alt-i2v --pred img.jpg folder/ --model model --format json"),
    "embed": (("--embed",), {"nargs": "+", "metavar": "FILE_OR_DIR"},
              "write L2-normalised embeddings of images to a .npy file",
              "alt-i2v --embed folder/ --model model --out emb.npy"),
    "index": (("--index",), {"dest": "index_action", "action": "store_true"},
              "build a similar-image index from a dataset or an image folder",
              "alt-i2v --index --model model --images folder/ --out folder.index"),
    "dedupe": (("--dedupe",), {"action": "store_true"},
               "find groups of near-copies in a dataset (DATA/reports/dedupe.json); --build keeps each group in "
               "one split",
               "alt-i2v --dedupe --data data [--model model]"),
    "similar": (("--similar",), {"metavar": "FILE"},
                "print the nearest images to one image",
                "alt-i2v --similar query.jpg --index folder.index --top-k 10"),
    "explain": (("--explain",), {"nargs": "+", "metavar": "FILE_OR_DIR"},
                "write Grad-CAM heat maps: where in each image the evidence for a tag lies",
                "alt-i2v --explain img.jpg folder/ --model model --tag blonde_hair,hat --out maps/"),
    "screen": (("--screen",), {"metavar": "SRC"},
               "sort a folder into OUT/ok and OUT/ng by tags (resumable; a move never loses a file)",
               'alt-i2v --screen raw/ --model model --keep "1girl,solo" --reject lowres --out sorted/ --move'),
    "export": (("--export",), {"action": "store_true"},
               "write the model as SavedModel, ONNX or TFLite (+ vocabulary, thresholds), parity-checked",
               "alt-i2v --export --model model --format onnx --out model-onnx/"),
    "demo": (("--demo",), {"nargs": "?", "const": "alt-i2v-demo", "metavar": "DIR"},
             "run the whole pipeline on generated data (offline; default DIR: ./alt-i2v-demo)",
             "alt-i2v --demo demo_run --quick"),
    "serve": (("--serve",), {"action": "store_true"},
              "a web page and JSON API: drop an image, see its tags, why, and similar images",
              "alt-i2v --serve --model model --index folder.index --port 8000"),
}

# Actions that load Keras (and, with the default backend, TensorFlow)
KERAS_ACTIONS = {"train", "evaluate", "pred", "embed", "index", "similar", "explain", "screen", "export", "demo",
                 "serve"}


def build_parser() -> argparse.ArgumentParser:
    lines = [f"  {flags[0]:11s} {h}\n  {'':11s} e.g. {ex}" for flags, _, h, ex in ACTIONS.values()]
    p = argparse.ArgumentParser(
        prog="alt-i2v",
        description="Learn to tag anime-style illustrations with many labels at once.",
        epilog="actions (exactly one per call):\n" + "\n".join(lines) +
               "\n\nexit codes: 0 ok, 1 failed, 2 usage error",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"alt-i2v {__version__}")
    act = p.add_argument_group("actions").add_mutually_exclusive_group(required=True)
    for dest, (flags, kw, text, _) in ACTIONS.items():
        act.add_argument(*flags, **{"dest": dest, **kw, "help": text})
    add_options(p)
    return p


def _parse(argv: Sequence[str] | None) -> tuple[str, argparse.Namespace]:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # --index is both an action flag (build an index) and the --similar/--serve option naming one, as the
    # documented command line has it; argparse gives a flag one role, so the option form is renamed here.
    if ("--similar" in argv or "--serve" in argv) and "--index" in argv:
        argv[argv.index("--index")] = "--index-path"
    args = parser.parse_args(argv)
    action = next(a for a in ACTIONS if _given(getattr(args, "index_action" if a == "index" else a, None)))
    allowed = ACTION_OPTIONS[action]
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


def _need(args: argparse.Namespace, name: str, action: str) -> str:
    value = getattr(args, name, None)
    if not value:
        raise UsageError(f"--{action} needs --{name.replace('_', '-')}")
    return value


# ---------------------------------------------------------------------------------------------------------
# Handlers: one per action, each calls one library function and prints its summary.


def cmd_scrape(args: argparse.Namespace) -> int:
    data = _need(args, "data", "scrape")
    from ..progress import summary
    from ..scraper import scrape

    result = scrape(data, args.query, quiet=args.quiet, **keywords(args, "scrape"))
    summary("scrape", result.summary(), quiet=args.quiet)
    return 0


def cmd_import_src(args: argparse.Namespace) -> int:
    from ..config import resolve_workers
    from ..data.posts import import_folder
    from ..progress import summary

    data = _need(args, "data", "import")
    result = import_folder(args.import_src, data, workers=resolve_workers(args.workers) * 2, quiet=args.quiet,
                           **keywords(args, "import_src"))
    summary("import", {**result.summary(), "report": str(DataDir(data).report("import_report"))},
            quiet=args.quiet)
    return 0


def cmd_vocab(args: argparse.Namespace) -> int:
    from ..data.tags import DEFAULT_CATEGORIES, split_tags
    from ..progress import summary
    from ..data.vocab import build_vocab

    data = _need(args, "data", "vocab")
    cats = split_tags(args.categories) or DEFAULT_CATEGORIES
    vocab = build_vocab(data, categories=cats, **keywords(args, "vocab"))
    top = ", ".join(f"{t['name']} ({t['count']})" for t in vocab.tags[:8])
    summary("vocab", {"tags": len(vocab), "from posts": vocab.built_from, "categories": ",".join(vocab.categories),
                      "most common": top or "-", "written": str(DataDir(data).vocab)}, quiet=args.quiet)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from ..progress import summary
    from ..store import build_store

    data = _need(args, "data", "build")
    result = build_store(data, quiet=args.quiet, **keywords(args, "build"))
    summary("build", {**result.summary(), "report": str(DataDir(data).report("build_report"))},
            quiet=args.quiet)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..progress import summary
    from ..training.run import train

    data = _need(args, "data", "train")
    model = _need(args, "model", "train")
    kw = keywords(args, "train")
    if args.init_from:
        if args.backbone or args.weights:
            raise UsageError("--init-from PROJECT is the starting network: leave --backbone and --weights out")
        kw.update(backbone="deepdanbooru", weights=args.init_from)
    result = train(data, model, quiet=args.quiet, distribution=_dist_config(args), **kw)
    summary("train", result.summary(), quiet=args.quiet or result.process != 0)
    return 0


def _dist_config(args: argparse.Namespace) -> Any:
    """--distribute/--devices/--coordinator/... over the cluster launcher's environment variables."""
    from ..training.distribute import DistConfig, settings_from_env

    return DistConfig(**{**settings_from_env(os.environ), **keywords(args, "train", part="distribution")})


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..progress import summary
    from ..ready import ALT_I2V, detect
    from ..training.evaluation import evaluate

    data = _need(args, "data", "evaluate")
    models = args.models or [_need(args, "model", "evaluate")]
    if len(models) > 1 or args.out or any(detect(m) != ALT_I2V for m in models):
        from ..tagging.compare import compare

        result = compare(data, models, out=args.out, quiet=args.quiet, **keywords(args, "evaluate"))
        summary("evaluate" if len(models) == 1 else "compare", result.summary(), quiet=args.quiet)
        return 1 if result.failed else 0
    result = evaluate(data, models[0], quiet=args.quiet, **keywords(args, "evaluate"))
    summary("evaluate", result.summary(), quiet=args.quiet)
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
    run_server(args.model, args.index, ServeConfig(**keywords(args, "serve")), quiet=args.quiet)
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "scrape": cmd_scrape, "import_src": cmd_import_src, "vocab": cmd_vocab, "build": cmd_build,
    "train": cmd_train, "evaluate": cmd_evaluate, "pred": cmd_pred, "embed": cmd_embed, "index": cmd_index,
    "dedupe": cmd_dedupe,
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
