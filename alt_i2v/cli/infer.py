"""Command lines of a trained model: ``--pred`` (tags, captions), ``--embed``, ``--index``, ``--similar``,
``--explain``, ``--screen`` and ``--export``.

Each handler checks its arguments, calls the library (tagger, search) and prints what it did.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import AltI2VError, ImageLoadError, UsageError
from ..data.tags import split_tags
from .options import EXPORT_FORMATS, PRED_FORMATS


def _emit(progress: Any, text: str, file: Any = None) -> None:
    """Print a line without breaking a progress bar drawn on stderr."""
    file = file or sys.stdout
    write = getattr(progress, "write", None)
    if callable(write) and not getattr(progress, "disable", True):
        write(text, file=file)
    else:
        print(text, file=file, flush=True)


def cmd_pred(args: argparse.Namespace) -> int:
    """``--pred FILES/DIRS --model DIR``: print tags (text/json/caption) and/or write caption files."""
    from ..data.captions import (DEFAULT_CAPTION_MODE, DEFAULT_TAG_STYLE, caption_conflicts, caption_path,
                                 check_max_tags, format_caption, format_tag, select_tags, write_caption)
    from ..data.tags import parse_tags
    from ..progress import bar, summary
    from ..tagging.inputs import check_top_k, list_images
    from ..tagging.tagger import get_tagger, parse_threshold

    if not args.model:
        raise UsageError("--pred needs --model DIR (a trained model directory, a WD14 folder or a DeepDanbooru "
                         "project)")
    if args.format is not None and args.format not in PRED_FORMATS:
        raise UsageError(f"--pred --format is one of {', '.join(PRED_FORMATS)}, not {args.format}")
    if not args.write_captions:
        for opt in ("caption_mode",):
            if getattr(args, opt, None):
                raise UsageError(f"--{opt.replace('_', '-')} applies only with --write-captions")
    check_max_tags(args.max_tags)
    threshold = parse_threshold(args.threshold)
    top_k = check_top_k(args.top_k)
    exclude = set(parse_tags(args.exclude))
    style = args.tag_style or DEFAULT_TAG_STYLE
    escape = not args.no_escape
    mode = args.caption_mode or DEFAULT_CAPTION_MODE
    fmt = args.format or ("text" if not args.write_captions else None)

    folders = [p for p in args.pred if Path(p).is_dir()]
    files = list_images(args.pred, recursive=bool(args.recursive))
    if not files:
        raise AltI2VError(f"no images found in {', '.join(args.pred)}" +
                          ("" if args.recursive else " (use --recursive for sub-folders)"))
    tagger = get_tagger(args.model, batch_size=args.batch_size, workers=args.workers)
    tagger.thresholds_for(threshold)  # a bad --threshold fails before any work
    categories = tagger.tag_categories
    conflicts = {img for group in caption_conflicts(files).values() for img in group} \
        if args.write_captions else set()

    counts = {"tagged": 0, "failed": 0, "written": 0, "overwritten": 0, "appended": 0, "unchanged": 0,
              "skipped": 0}
    failed: list[str] = []
    single_file = len(files) == 1 and not folders
    progress = bar(total=len(files), desc="tag", unit="img", quiet=args.quiet or not folders)
    try:
        for i, result, ratings in tagger.iter_predict(files, threshold, top_k, with_ratings=True):
            file = files[i]
            progress.update(1)
            if isinstance(result, ImageLoadError):
                counts["failed"] += 1
                failed.append(file)
                if fmt == "json":
                    _emit(progress, json.dumps({"file": file, "error": str(result), "reason": result.reason},
                                               ensure_ascii=False))
                _emit(progress, f"alt-i2v: skipped {result}", sys.stderr)
                continue
            counts["tagged"] += 1
            if fmt == "json":
                _emit(progress, json.dumps({"file": file, "tags": result, **({"rating": ratings} if ratings else {})},
                                           ensure_ascii=False))
            elif fmt == "caption":
                line = format_caption(result, categories, style=style, escape=escape, exclude=exclude,
                                      max_tags=args.max_tags)
                _emit(progress, line if single_file else f"{file}\t{line}")
            elif fmt == "text":
                lines = [file] + [f"  {p:.3f}  {t}" for t, p in result.items()]
                if not result:
                    lines.append("  (no tag above its threshold)")
                if ratings:
                    lines.append("  rating: " + ", ".join(f"{t} {p:.3f}" for t, p in ratings.items()))
                _emit(progress, "\n".join(lines))
            if args.write_captions:
                if file in conflicts:
                    counts["failed"] += 1
                    failed.append(file)
                    _emit(progress, f"alt-i2v: not captioned {file}: another image would share "
                                    f"{caption_path(file).name}; rename one of them", sys.stderr)
                    continue
                names = select_tags(result, categories, exclude=exclude, max_tags=args.max_tags)
                try:
                    what = write_caption(file, [format_tag(t, style, escape) for t in names], mode)
                except OSError as e:
                    counts["failed"] += 1
                    failed.append(file)
                    _emit(progress, f"alt-i2v: cannot write {caption_path(file)}: {e}", sys.stderr)
                    continue
                counts[what] += 1
    finally:
        progress.close()
    if args.write_captions or folders:
        rows = {"images": len(files), "tagged": counts["tagged"], "failed": counts["failed"]}
        if args.write_captions:
            rows.update({"captions written": counts["written"] + counts["overwritten"],
                         "appended": counts["appended"], "unchanged": counts["unchanged"],
                         "skipped (caption exists)": counts["skipped"], "caption mode": mode})
            if counts["skipped"] and mode == "skip":
                rows["hint"] = "--caption-mode append adds new tags, overwrite replaces the file"
        summary("pred", rows, quiet=args.quiet, file=sys.stderr if fmt else None)
    return 1 if failed else 0


def cmd_embed(args: argparse.Namespace) -> int:
    """``--embed FILES/DIRS --model DIR --out FILE.npy``: embeddings plus ``FILE.ids.json`` (the paths)."""
    from ..progress import summary
    from ..tagging.embeddings import write_embeddings
    from ..tagging.inputs import list_images
    from ..tagging.tagger import get_tagger

    if not args.model:
        raise UsageError("--embed needs --model DIR")
    if not args.out:
        raise UsageError("--embed needs --out FILE.npy")
    files = list_images(args.embed, recursive=bool(args.recursive))
    if not files:
        raise AltI2VError(f"no images found in {', '.join(args.embed)}")
    tagger = get_tagger(args.model, batch_size=args.batch_size, workers=args.workers)
    emb, ok, failures = tagger.embed_files(files, quiet=args.quiet)
    for f in failures:
        print(f"alt-i2v: skipped {f['error']}", file=sys.stderr)
    out, ids_file = write_embeddings(args.out, emb, [files[i] for i in ok], model=tagger.model_dir, failed=failures)
    summary("embed", {"embeddings": f"{len(emb)} x {emb.shape[1]} float32 (L2-normalised)", "file": str(out),
                      "ids": str(ids_file), "failed": len(failures)}, quiet=args.quiet)
    return 1 if failures else 0


def cmd_index(args: argparse.Namespace) -> int:
    """``--index --model DIR (--data DIR | --images DIR) --out INDEX [--index-type T]``; ``--add`` grows the
    index at --out with the images it lacks; ``--remove IDS --out INDEX`` takes ids out of it."""
    from ..progress import summary
    from ..search import add_to_index, build_index, faiss_available, open_index

    if not args.out:
        raise UsageError("--index needs --out INDEX (the index directory to create or change)")
    if args.remove:
        return _remove_from_index(args)
    if not args.model:
        raise UsageError("--index needs --model DIR (the model whose embeddings are indexed)")
    if bool(args.data) == bool(args.images):
        raise UsageError("--index needs exactly one of --data DIR (a dataset) or --images DIR (a folder)")
    kind = args.index_type or ("ivf-sq8" if args.approx else None)
    if (args.approx or kind in ("ivf-sq8", "ivf-pq")) and not faiss_available():
        raise UsageError(f"--{'approx' if args.approx else 'index-type ' + kind} needs faiss: "
                         "pip install 'alt-i2v[faiss]'")
    t0 = time.perf_counter()
    if args.add:
        if kind:
            raise UsageError("--add keeps the index's own type; leave --index-type/--approx out")
        index, tagger = open_index(args.out, args.model)  # refuses an index another model made
        added, failures = add_to_index(tagger, index, args.out, data=args.data or None, images=args.images or None,
                                       recursive=bool(args.recursive), quiet=args.quiet)
        result = {"index": str(args.out), "added": added, "images": len(index), "failed": len(failures),
                  "type": index.kind}
    else:
        from ..tagging.tagger import get_tagger

        tagger = get_tagger(args.model, batch_size=args.batch_size, workers=args.workers)
        index, failures = build_index(tagger, data=args.data or None, images=args.images or None,
                                      recursive=bool(args.recursive), kind=kind, out=args.out, quiet=args.quiet)
        result = {"index": str(args.out), "images": len(index), "failed": len(failures), "dim": index.dim,
                  "type": index.kind, "approximate": index.approx_params or "no (exact search)"}
    for f in failures:
        print(f"alt-i2v: skipped {f['error']}", file=sys.stderr)
    summary("index", {**result, "seconds": round(time.perf_counter() - t0, 1)}, quiet=args.quiet)
    return 1 if failures else 0


def _remove_from_index(args: argparse.Namespace) -> int:
    """``--index --remove IDS --out INDEX``: ids as the index holds them (a number is a post id)."""
    from ..progress import summary
    from ..search import SimilarityIndex

    if args.add or args.data or args.images:
        raise UsageError("--remove takes ids out of --out INDEX; leave --add, --data and --images out")
    index = SimilarityIndex.load(args.out)
    held = set(index.ids)
    wanted = []
    for token in (t.strip() for t in args.remove.split(",") if t.strip()):
        as_int = int(token) if token.lstrip("-").isdigit() else None
        wanted.append(as_int if as_int is not None and as_int in held else token)
    missing = [w for w in wanted if w not in held or not index._has(w)]
    if missing:
        raise UsageError(f"not in {args.out}: {missing[:5]} (nothing was removed)")
    removed = index.remove(wanted)
    index.save(args.out)
    summary("index", {"index": str(args.out), "removed": removed, "images": len(index)}, quiet=args.quiet)
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    """``--similar FILE --index INDEX [--top-k 10] [--model DIR]``: nearest images with cosine scores."""
    from ..search import open_index

    if not args.index:
        raise UsageError("--similar needs --index INDEX (made by --index)")
    index, tagger = open_index(args.index, args.model)
    query = tagger.embed(args.similar)
    scores, pos = index.search_positions(query[None, :], args.top_k or 10)
    rows = [(rank, s, index.id_at(int(p)), index.path_at(int(p)))
            for rank, (s, p) in enumerate(zip(scores[0], pos[0]), 1) if p >= 0]
    # an index of a folder uses the file as its id; one of a dataset has post ids beside the files
    ids_are_files = all(path is not None and str(i) == path for _, _, i, path in rows)
    has_paths = all(path is not None for *_, path in rows)
    print(f"nearest to {args.similar} ({len(index)} indexed, "
          f"{'approximate' if index.has_approx else 'exact'} search, cosine):")
    print("rank  cosine  " + ("file" if ids_are_files else "id  file" if has_paths else "id"))
    for rank, s, ident, path in rows:
        label = path if ids_are_files else (f"{ident}  {path}" if path is not None else str(ident))
        print(f"{rank:4d}  {s:.4f}  {label}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """``--explain FILES/DIRS --model DIR [--tag T,...] [--top-k K] [--out DIR]``: Grad-CAM pictures."""
    import os

    from ..tagging.gradcam import DEFAULT_TOP_K, explain_images
    from ..progress import summary
    from ..tagging.inputs import list_images

    if not args.model:
        raise UsageError("--explain needs --model DIR (a trained model directory)")
    if args.tag and args.top_k is not None:
        raise UsageError("--explain takes --tag or --top-k, not both")
    files = list_images(args.explain, recursive=bool(args.recursive))
    if not files:
        raise UsageError(f"no images found in {', '.join(args.explain)}" +
                         ("" if args.recursive else " (use --recursive for sub-folders)"))
    roots = [p for p in args.explain if os.path.isdir(p)]
    result = explain_images(files, args.model, args.out or "explain", tags=split_tags(args.tag) or None,
                            top_k=DEFAULT_TOP_K if args.top_k is None else args.top_k, quiet=args.quiet, roots=roots)
    for f in result.failed:
        print(f"alt-i2v: skipped {f['error']}", file=sys.stderr)
    summary("explain", result.summary(), quiet=args.quiet)
    return 1 if result.failed else 0


def cmd_screen(args: argparse.Namespace) -> int:
    """``--screen SRC --model DIR --keep T,... [--reject T,...] --out DIR [--move] [--dry-run]``."""
    from ..progress import summary
    from ..tagging.screening import screen
    from ..tagging.tagger import parse_threshold

    if not args.model:
        raise UsageError("--screen needs --model DIR (a trained model directory)")
    if not args.out:
        raise UsageError("--screen needs --out DIR (where ok/, ng/ and the report go)")
    result = screen(args.screen, args.model, args.out, keep=split_tags(args.keep), reject=split_tags(args.reject),
                    threshold=parse_threshold(args.threshold), move=args.move, dry_run=args.dry_run,
                    quiet=args.quiet, batch_size=args.batch_size, workers=args.workers)
    for f in result.unreadable:
        print(f"alt-i2v: left in place, cannot read {f['error']}", file=sys.stderr)
    summary("screen", result.summary(), quiet=args.quiet)
    return 1 if result.unreadable else 0


def cmd_export(args: argparse.Namespace) -> int:
    """``--export --model DIR --format savedmodel|onnx|tflite --out DIR``: written, then parity-checked."""
    from ..tagging.exporting import export
    from ..progress import summary

    if not args.model:
        raise UsageError("--export needs --model DIR (a trained model directory)")
    if not args.out:
        raise UsageError("--export needs --out DIR (a new folder for the exported model)")
    if args.format not in EXPORT_FORMATS:
        raise UsageError(f"--export needs --format {'|'.join(EXPORT_FORMATS)}" +
                         (f", not {args.format}" if args.format else ""))
    result = export(args.model, args.out, args.format, quiet=args.quiet)
    summary("export", result.summary(), quiet=args.quiet)
    return 0
