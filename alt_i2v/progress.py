"""Progress bars and one-screen summaries, silenced by ``quiet``; counting skip reasons for reports."""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any, Iterable, Mapping


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
