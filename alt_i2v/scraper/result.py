"""What a scrape did (:class:`ScrapeResult`) and the one-screen summary the CLI prints of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..progress import count_reasons


@dataclass
class ScrapeResult:
    """What a scrape did: counts, the skipped posts with reasons, failed pages, request statistics."""

    data_dir: str = ""
    source: str = "api"
    queries: list[str] = field(default_factory=list)
    stored: int = 0
    adopted: int = 0
    present: int = 0
    repaired: int = 0
    repeated: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"id", "reason", "detail", "query"}
    failed_pages: list[dict] = field(default_factory=list)  # {"query", "page", "reason", "detail"}
    notes: list[str] = field(default_factory=list)
    new_ids: list[int] = field(default_factory=list)
    requests: int = 0
    retries: int = 0
    bytes: int = 0
    elapsed: float = 0.0
    rate_limit: float = 1.0
    stale_temps_removed: int = 0
    limit: int | None = None
    limit_reached: bool = False
    interrupted: bool = False
    report_path: str = ""

    def skip_counts(self) -> dict[str, int]:
        return count_reasons(self.skipped)

    def summary(self) -> dict[str, Any]:
        rate = self.requests / self.elapsed if self.elapsed > 0 else 0.0
        rows: dict[str, Any] = {
            "source": self.source, "queries": len(self.queries), "new posts": self.stored,
            "already present": self.present, "files repaired": self.repaired, "skipped": len(self.skipped),
            "skip reasons": self.skip_counts(), "failed pages": len(self.failed_pages),
            "requests": self.requests, "retries": self.retries, "downloaded MB": round(self.bytes / 1e6, 2),
            "elapsed s": round(self.elapsed, 1),
            "request rate": f"{rate:.2f}/s (limit {self.rate_limit:g}/s)",
        }
        if self.repeated:
            rows["repeated across queries"] = self.repeated
        if self.stale_temps_removed:
            rows["stale temp files removed"] = self.stale_temps_removed
        if self.interrupted:
            rows["interrupted"] = "yes: run the same command again to resume"
        if self.report_path:
            rows["report"] = self.report_path
        return rows


__all__ = ["ScrapeResult"]
