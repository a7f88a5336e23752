"""What `labscale run` writes beside the markdown report: the self-contained HTML report (`.html`) and the results
JSON (`.json`, schema in docs/report.md; `labscale export` also writes the samples JSONL)."""

from __future__ import annotations

from pathlib import Path


def write_beside(db: Path, report: Path) -> list[Path]:
    from labscale.report.export import write_export
    from labscale.report.html import write_html

    return [write_html(db, report.with_suffix(".html")), *write_export(db, "json", report.with_suffix(".json"),
                                                                        with_samples=False)]
