"""Screening a folder (``--screen``): sort a raw collection into OUT/ok and OUT/ng by tags, losing nothing.

Every image under SRC is tagged and copied (or moved) to ``OUT/ok/<its path>`` or ``OUT/ng/<its path>``;
files that cannot be decoded go to ``OUT/error/<its path>``. A journal (``OUT/.screen/journal.jsonl``,
fsync'ed JSON lines) records each file's destination *before* it is written and marks it done after the
copy is verified (and, for a move, after the source is removed), so a run killed at any instant resumes
without redoing finished files, overwriting anything, or placing a file twice. ``OUT/screen_report.csv``
lists every file with its decision, the deciding tag and its probability.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import AltI2VError, ImageLoadError, UsageError

STATE_DIR = ".screen"
JOURNAL = "journal.jsonl"
SETTINGS = "settings.json"
LOCK = "lock"  # OUT/.screen/lock: one --screen writes into a folder at a time
REPORT = "screen_report.csv"
DECISIONS = ("ok", "ng", "error")
REPORT_FIELDS = ("file", "decision", "tag", "probability", "rule", "destination")


@dataclass
class ScreenResult:
    """Counts of one run (``resumed``: files a previous, interrupted run had finished)."""

    out_dir: Path
    report: Path
    mode: str
    dry_run: bool
    counts: dict[str, int] = field(default_factory=lambda: {d: 0 for d in DECISIONS})
    resumed: int = 0
    recovered: int = 0
    unreadable: list[dict[str, str]] = field(default_factory=list)  # could not even be copied: left in SRC
    images: int = 0

    def summary(self) -> dict[str, Any]:
        rows: dict[str, Any] = {"images": self.images, "ok": self.counts["ok"], "ng": self.counts["ng"],
                                "error (not decodable)": self.counts["error"]}
        if self.resumed or self.recovered:
            rows["resumed"] = f"{self.resumed} finished earlier, {self.recovered} half-done completed"
        if self.unreadable:
            rows["left in place"] = f"{len(self.unreadable)} (cannot be read: {self.unreadable[0]['error']})"
        rows["mode"] = "dry run (nothing copied or moved)" if self.dry_run else self.mode
        rows["report"] = str(self.report)
        return rows


def decide(probs: np.ndarray, keep: Sequence[int], reject: Sequence[int], thresholds: np.ndarray,
           names: Sequence[str]) -> tuple[str, str, float, str]:
    """``(decision, deciding tag, its probability, rule)`` of one image: a reject tag at or above its
    threshold makes it ng; else a keep tag at or above its threshold makes it ok; else ng (no keep tag).
    With no keep tags, an image without a reject tag is ok."""
    hits = [i for i in reject if probs[i] >= thresholds[i]]
    if hits:
        i = max(hits, key=lambda j: probs[j])
        return "ng", names[i], float(probs[i]), "reject tag"
    if not keep:
        i = max(reject, key=lambda j: probs[j])
        return "ok", names[i], float(probs[i]), "no reject tag"
    hits = [i for i in keep if probs[i] >= thresholds[i]]
    i = max(hits or keep, key=lambda j: probs[j])
    return ("ok", names[i], float(probs[i]), "keep tag") if hits else ("ng", names[i], float(probs[i]), "no keep tag")


class _Journal:
    """The resume state: ``plan`` records (file -> destination, sha256, decision) written before a copy,
    ``done`` records after it is verified; both fsync'ed, read back on the next run."""

    def __init__(self, out: Path):
        from ..fsutil import JsonlWriter, read_jsonl

        self.path = out / STATE_DIR / JOURNAL
        self.plans: dict[str, dict] = {}
        self.done: set[str] = set()
        self.writer = JsonlWriter(self.path)  # cuts a line torn by a kill before reading
        for rec in read_jsonl(self.path):
            if rec.get("op") == "plan":
                self.plans[rec["file"]] = rec
            elif rec.get("op") == "done":
                self.done.add(rec["file"])
        self.taken = {p["destination"] for p in self.plans.values() if p.get("destination")}

    def plan(self, records: list[dict]) -> None:
        self.writer.append_many({"op": "plan", **r} for r in records)
        for r in records:
            self.plans[r["file"]] = {"op": "plan", **r}

    def finish(self, files: list[str]) -> None:
        self.writer.append_many({"op": "done", "file": f} for f in files)
        self.done.update(files)

    def close(self) -> None:
        self.writer.close()


def _free_destination(out: Path, decision: str, rel: str, taken: set[str]) -> str:
    """``<decision>/<rel>``, or ``<decision>/<stem>-2<ext>``... when that name exists or is promised to
    another file: nothing is ever overwritten."""
    base = Path(decision) / rel
    candidate, n = base, 1
    while candidate.as_posix() in taken or (out / candidate).exists():
        n += 1
        candidate = base.with_name(f"{base.stem}-{n}{base.suffix}")
    taken.add(candidate.as_posix())
    return candidate.as_posix()


def _carry(src: Path, dst: Path, sha256: str, move: bool, *, check_source: bool) -> set[Path]:
    """Copy ``src`` to ``dst`` (atomic, fsync'ed), check the copy's sha256, then for a move remove the
    source; returns the directories whose entries changed (the caller fsyncs them, once per batch, before
    it marks the files done). Safe to call again after a crash at any point: a verified copy is not made
    twice. ``check_source``: hash the source again before removing it (when time passed since planning)."""
    from ..fsutil import atomic_copy, file_digest

    dirs = set()
    if not (dst.exists() and file_digest(dst) == sha256):
        if not src.exists():
            raise AltI2VError(f"{src} vanished before it was copied to {dst}")
        new_dir = dst.parent
        while not new_dir.exists():  # a folder made now is durable once its parent is fsync'ed
            dirs.add(new_dir.parent)
            new_dir = new_dir.parent
        atomic_copy(src, dst, sync_dir=False)
        dirs.add(dst.parent)
        if file_digest(dst) != sha256:
            dst.unlink()
            raise AltI2VError(f"the copy of {src} at {dst} does not match it (changed while copying, or a disk "
                              "fault); the source is kept")
    if move and src.exists():
        if check_source and file_digest(src) != sha256:
            raise AltI2VError(f"{src} changed since it was screened; it is kept, and its earlier copy is {dst}")
        src.unlink()
        dirs.add(src.parent)
    return dirs


def screen(src: str | os.PathLike, model: Any, out: str | os.PathLike, *, keep: Sequence[str] = (),
           reject: Sequence[str] = (), threshold: Any = None, move: bool = False, dry_run: bool = False,
           quiet: bool = False, batch_size: int | None = None, workers: int | None = None) -> ScreenResult:
    """Sort every image under ``src`` into ``out/ok`` or ``out/ng`` (``out/error`` when it cannot be
    decoded), keeping relative paths, and write ``out/screen_report.csv``.

    ``keep``: tags of which one must be present for ok; ``reject``: tags that make an image ng whatever
    else it shows. ``threshold``: None = the model's calibrated per-tag thresholds, a float, or a dict per
    category/tag (as ``predict_tags``). ``move`` removes each source after its copy is verified; ``dry_run``
    writes only the report. An interrupted run resumes where it stopped when called again the same way.
    """
    from ..fsutil import list_image_files, lock_file
    from .tagger import get_tagger

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise UsageError(f"--screen: {src} is not a folder")
    if not keep and not reject:
        raise UsageError("--screen needs --keep TAGS and/or --reject TAGS")
    if out.resolve() == src.resolve():
        raise UsageError("--out must differ from the folder screened (a folder inside it is left out of it)")
    tagger = get_tagger(model, batch_size=batch_size, workers=workers)
    index = tagger.vocab.index
    unknown = [t for t in [*keep, *reject] if t not in index]
    if unknown:
        raise UsageError(f"tags {unknown} are not in the model's vocabulary (e.g. {', '.join(list(index)[:6])})")
    thresholds = tagger.thresholds_for(threshold)
    keep_i, reject_i = [index[t] for t in keep], [index[t] for t in reject]
    names = tagger.vocab.names

    settings = {"source": str(src.resolve()), "model": tagger.fingerprint(), "keep": list(keep),
                "reject": list(reject), "threshold": threshold, "mode": "move" if move else "copy"}
    result = ScreenResult(out_dir=out, report=out / REPORT, mode=settings["mode"], dry_run=dry_run)
    files, _ = list_image_files(src, exclude=out)
    rel_of = {f: f.relative_to(src).as_posix() for f in files}

    args = (keep_i, reject_i, thresholds, names)
    if dry_run:  # writes the report alone, in one atomic rename
        return _screen(tagger, src, out, files, rel_of, settings, result, args, move=move, dry_run=True, quiet=quiet)
    with lock_file(out / STATE_DIR / LOCK, f"{out}: another --screen is writing into this folder now; wait for "
                   "it to finish (or give another --out)"):
        return _screen(tagger, src, out, files, rel_of, settings, result, args, move=move, dry_run=False,
                       quiet=quiet)


def _screen(tagger: Any, src: Path, out: Path, files: list[Path], rel_of: dict, settings: dict,
            result: ScreenResult, decide_args: tuple, *, move: bool, dry_run: bool, quiet: bool) -> ScreenResult:
    """The run itself, under OUT's lock."""
    from ..fsutil import (NotRegularFile, atomic_write_json, atomic_write_text, file_digest, fsync_dir, printable,
                          read_json, remove_stale_temps)
    from ..progress import bar

    report = result.report
    if dry_run:
        rows = []
        progress = bar(total=len(files), desc="screen (dry run)", unit="img", quiet=quiet)
        try:
            for rel, decision, tag, prob, rule in _decisions(tagger, files, rel_of, decide_args=decide_args):
                rows.append({"file": rel, "decision": decision, "tag": tag, "probability": prob, "rule": rule,
                             "destination": ""})
                result.counts[decision] += 1
                progress.update(1)
        finally:
            progress.close()
        result.images = len(files)
        atomic_write_text(report, _csv(rows))
        return result

    state = out / STATE_DIR
    if (state / SETTINGS).exists():
        old = read_json(state / SETTINGS)
        if old != settings:
            changed = ", ".join(k for k in settings if old.get(k) != settings[k])
            raise UsageError(f"{out} holds a screening made with other settings ({changed}); run it again as it "
                             f"was to finish it, or choose another --out (or delete {state})")
    else:
        atomic_write_json(state / SETTINGS, settings)
    remove_stale_temps(out, exclude=[src])  # only this program's temp names, never inside a source within OUT
    journal = _Journal(out)
    try:
        # 1. files a killed run had planned but not finished: complete them exactly as planned
        for rel, plan in list(journal.plans.items()):
            if rel in journal.done:
                continue
            if plan.get("destination"):
                dst = out / plan["destination"]
                if not (src / rel).exists() and not dst.exists():  # deleted by hand since: nothing to carry
                    journal.plan([{**plan, "decision": "error", "destination": "",
                                   "rule": "the file vanished before it was copied"}])
                else:
                    for d in _carry(src / rel, dst, plan["sha256"], move, check_source=True):
                        fsync_dir(d)
            journal.finish([rel])
            result.recovered += 1
        result.resumed = len(journal.done) - result.recovered
        todo = [f for f in files if rel_of[f] not in journal.done]
        progress = bar(total=len(todo), desc="screen", unit="img", quiet=quiet)
        try:
            batch: list[dict] = []
            for rel, decision, tag, prob, rule in _decisions(tagger, todo, rel_of, decide_args=decide_args):
                path = src / rel
                try:
                    sha = file_digest(path)  # a FIFO or a device is refused here, never read
                except (OSError, NotRegularFile) as e:
                    why = "not a regular file" if isinstance(e, NotRegularFile) else e.strerror or str(e)
                    result.unreadable.append({"file": rel, "error": f"{printable(rel)}: {why}"})
                    batch.append({"file": rel, "decision": "error", "tag": "", "probability": None,
                                  "rule": f"cannot read: {why}", "destination": "", "sha256": ""})
                else:
                    dest = _free_destination(out, decision, rel, journal.taken)
                    batch.append({"file": rel, "decision": decision, "tag": tag, "probability": prob,
                                  "rule": rule, "destination": dest, "sha256": sha})
                if len(batch) >= 32:
                    _commit(batch, journal, src, out, move, progress)
                    batch = []
            _commit(batch, journal, src, out, move, progress)
        finally:
            progress.close()
    finally:
        journal.close()

    rows = []
    for rel, plan in journal.plans.items():
        if rel in journal.done:
            rows.append({k: plan.get(k, "") for k in REPORT_FIELDS})
            result.counts[plan["decision"]] += 1
    rows.sort(key=lambda r: r["file"])
    result.images = len(rows)
    atomic_write_text(report, _csv(rows))
    return result


def _commit(batch: list[dict], journal: _Journal, src: Path, out: Path, move: bool, progress: Any) -> None:
    """Plan a batch (one fsync), carry each file, then mark them done (one fsync)."""
    if not batch:
        return
    from ..fsutil import fsync_dir

    journal.plan(batch)
    dirs: set[Path] = set()
    for rec in batch:
        if rec["destination"]:
            dirs |= _carry(src / rec["file"], out / rec["destination"], rec["sha256"], move, check_source=False)
    for d in dirs:
        fsync_dir(d)
    journal.finish([rec["file"] for rec in batch])
    progress.update(len(batch))


def _decisions(tagger: Any, files: Sequence[Path], rel_of: dict, decide_args: tuple):
    """``(rel, decision, tag, probability, rule)`` per file in order, decoding on threads in batches."""
    for start, loaded, ok, probs in tagger.iter_probabilities(list(files)):
        row = {i: r for r, i in enumerate(ok)}
        for i, x in enumerate(loaded):
            rel = rel_of[files[start + i]]
            if isinstance(x, ImageLoadError):
                yield rel, "error", "", None, f"{x.reason}: {x}"
            else:
                keep, reject, thresholds, names = decide_args
                p = probs[row[i]]
                yield (rel, *decide(p, keep, reject, tagger.row_thresholds(p, thresholds), names))  # MCut per image


def _csv(rows: list[dict]) -> str:
    from ..fsutil import printable

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=REPORT_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        p = r.get("probability")
        w.writerow({**{k: printable(v) if isinstance(v, str) else v for k, v in r.items()},
                    "probability": "" if p is None else f"{p:.4f}"})
    return buf.getvalue()


__all__ = ["screen", "decide", "ScreenResult", "REPORT"]
