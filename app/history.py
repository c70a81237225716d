"""This session's runs: one row per answer (any method) and the sweep points, kept
process-wide under the session's id (bounded), exported as CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from app.lru import BoundedLRU

COLUMNS = (
    "time", "method", "ratio", "tokens", "positions", "ttft_ms", "compress_ms", "prefill_ms", "first_token_ms",
    "tokens_per_s", "new_tokens", "peak_mem_mib", "peak_mem_above_weights_mib", "kv_cache_mib", "cached", "dtype",
    "prefix_reused_positions", "prefill_positions", "question", "answer",
)


def rounded(value: float | None, digits: int = 1) -> float | None:
    """A number as people read it (tenths of a millisecond); the results JSON keeps every digit."""
    return None if value is None else round(value, digits)


def run_row(result: dict, method: str) -> dict:
    """A history row from one answer's result (see Studio.ask)."""
    mib = 2**20
    return {
        "time": time.strftime("%H:%M:%S"), "method": method, "ratio": result.get("ratio"),
        "tokens": result.get("tokens"), "positions": result.get("positions"),
        "prefix_reused_positions": result.get("prefix_reused_positions"),
        "prefill_positions": result.get("prefill_positions"),
        "ttft_ms": rounded(result.get("ttft_ms")), "compress_ms": rounded(result.get("compress_ms")),
        "prefill_ms": rounded(result.get("prefill_ms")), "first_token_ms": rounded(result.get("first_token_ms")),
        "tokens_per_s": rounded(result.get("tokens_per_s")), "new_tokens": result.get("new_tokens"),
        "peak_mem_mib": round(result.get("peak_mem_bytes", 0) / mib, 1),
        "peak_mem_above_weights_mib": round(result.get("peak_mem_above_weights_bytes", 0) / mib, 1),
        "kv_cache_mib": round(result.get("kv_cache_bytes", 0) / mib, 3),
        "cached": result.get("cached"), "dtype": result.get("dtype"), "question": result.get("question", ""),
        "answer": result.get("answer", ""),
    }


FOLLOW_UP_COLUMNS = ("method", "dtype", "first questions", "first TTFT ms", "follow-ups", "follow-up TTFT ms",
                     "first / follow-up")


def follow_up_summary(rows: list[dict]) -> list[dict]:
    """Per method and dtype: the median TTFT of first questions (nothing reused) and of
    follow-ups (the prompt prefix's KV taken from the prefix cache), and their ratio."""
    groups: dict[tuple, dict[bool, list[float]]] = {}
    for row in rows:
        if row.get("ttft_ms") is None:
            continue
        group = groups.setdefault((row["method"], row.get("dtype")), {False: [], True: []})
        group[bool(row.get("prefix_reused_positions"))].append(row["ttft_ms"])
    out = []
    for (method, dtype), times in groups.items():
        first = statistics.median(times[False]) if times[False] else None
        follow = statistics.median(times[True]) if times[True] else None
        out.append({"method": method, "dtype": dtype, "first questions": len(times[False]),
                    "first TTFT ms": round(first, 1) if first is not None else None, "follow-ups": len(times[True]),
                    "follow-up TTFT ms": round(follow, 1) if follow is not None else None,
                    "first / follow-up": round(first / follow, 1) if first and follow else None})
    return out


@dataclass
class SessionRuns:
    runs: deque = field(default_factory=lambda: deque(maxlen=500))
    sweep: list[dict] = field(default_factory=list)


class RunHistory:
    """Runs per session id, least-recently-used sessions dropped beyond `max_sessions`."""

    def __init__(self, max_sessions: int = 256):
        self.max_sessions = max_sessions
        self._sessions: BoundedLRU[str, SessionRuns] = BoundedLRU(max_sessions)

    def _session(self, session: str) -> SessionRuns:
        """The session's record, created (and the oldest dropped) where it has none."""
        return self._sessions.setdefault(session or "", SessionRuns)

    def _peek(self, session: str) -> SessionRuns:
        return self._sessions.get(session or "", SessionRuns())

    def add(self, session: str, row: dict) -> None:
        self._session(session).runs.append(row)

    def set_sweep(self, session: str, points: list[dict]) -> None:
        self._session(session).sweep = list(points)

    def rows(self, session: str) -> list[dict]:
        return list(self._peek(session).runs)

    def sweep(self, session: str) -> list[dict]:
        return list(self._peek(session).sweep)

    def forget(self, session: str) -> None:
        self._sessions.pop(session or "")


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_json(rows: list[dict], sweep: list[dict]) -> str:
    return json.dumps({"runs": rows, "sweep": sweep}, indent=2, ensure_ascii=False)
