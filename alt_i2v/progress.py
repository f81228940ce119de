"""Progress bars, one-screen summaries and JSON reports, all silenced by ``quiet``."""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

from .fsutil import atomic_write_json
from .data.layout import DataDir


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        quiet: bool = False, **kw: Any):
    """A tqdm bar on stderr; disabled when ``quiet``."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=quiet, dynamic_ncols=True,
                file=sys.stderr, **kw)


def summary(title: str, rows: Mapping[str, Any], *, quiet: bool = False, file=None) -> str:
    """Print an aligned ``key: value`` block under ``title`` (stdout); returns the text."""
    width = max((len(k) for k in rows), default=0)
    lines = [f"== {title} =="] + [f"  {k.ljust(width)} : {_fmt(v)}" for k, v in rows.items()]
    text = "\n".join(lines)
    if not quiet:
        print(text, file=file or sys.stdout, flush=True)
    return text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) or "-"
    return str(v)


def count_reasons(skipped: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """How many skipped items (dicts with a ``reason``) there are of each reason, by reason name."""
    return dict(sorted(Counter(s["reason"] for s in skipped).items()))


def write_report(data_dir: str | Path, name: str, report: Mapping[str, Any]) -> Path:
    """Atomically write ``DATA/reports/<name>.json`` and return its path."""
    path = DataDir(data_dir).report(name)
    payload = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **report}
    return atomic_write_json(path, payload)
