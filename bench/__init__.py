"""Benchmarks: quality, speed and memory, load, and the long-document and busy-machine runs."""

from __future__ import annotations

import json
from pathlib import Path


def save_results(stem: str | Path, result: dict, table: str) -> None:
    """A benchmark's result as `<stem>.json` and its Markdown table as `<stem>.md`; the table printed."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    stem.with_suffix(".md").write_text(table)
    print(table)
