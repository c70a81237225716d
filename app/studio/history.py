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

from app.engine.answer import Answer
from app.engine.lru import BoundedLRU
from app.engine.measure import MiB

COLUMNS = (
    "time", "method", "ratio", "tokens", "positions", "ttft_ms", "compress_ms", "prefill_ms", "first_token_ms",
    "tokens_per_s", "new_tokens", "peak_mem_mib", "peak_mem_above_weights_mib", "kv_cache_mib", "cached", "dtype",
    "prefix_reused_positions", "prefill_positions", "question", "answer",
)


def rounded(value: float | None, digits: int = 1) -> float | None:
    """A number as people read it (tenths of a millisecond); the results JSON keeps every digit."""
    return None if value is None else round(value, digits)


def run_row(answer: Answer, method: str) -> dict:
    """A history row from one answer (see Studio.ask), under the name the page gave its method."""
    m = answer.measurement
    return {
        "time": time.strftime("%H:%M:%S"), "method": method, "ratio": answer.ratio, "tokens": answer.tokens,
        "positions": m.positions, "prefix_reused_positions": m.prefix_reused_positions,
        "prefill_positions": m.prefill_positions, "ttft_ms": rounded(m.ttft_ms), "compress_ms": rounded(m.compress_ms),
        "prefill_ms": rounded(m.prefill_ms), "first_token_ms": rounded(m.first_token_ms),
        "tokens_per_s": rounded(m.tokens_per_s), "new_tokens": m.new_tokens,
        "peak_mem_mib": round(m.peak_mem_bytes / MiB, 1),
        "peak_mem_above_weights_mib": round(m.peak_mem_above_weights_bytes / MiB, 1),
        "kv_cache_mib": round(m.kv_cache_bytes / MiB, 3), "cached": answer.cached,
        "dtype": answer.precision.get("dtype"), "question": answer.question, "answer": answer.text,
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
