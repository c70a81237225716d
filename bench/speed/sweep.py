"""The sweep: every (method, ratio, length) of a plan, measured `runs` times after a warm-up,
with the runs interleaved (run 1 of everything, then run 2, ...) so that a noisy machine
disturbs all methods alike. Points that cannot or need not run get a status instead:

    ok                      measured (median of `runs` samples, fewer when one run is long)
    does_not_fit            the predicted peak memory exceeds the device (or an earlier OOM)
    oom                     ran out of device memory
    exceeds_max_positions   the decoder cannot address that many positions
    not_planned             outside the plan's per-method length caps (time)
    over_budget             the plan's time budget ran out first, or the point's run, predicted
                            from shorter ones, would end past it (a resumed sweep runs it later)
    error                   the method raised (the message is kept); the sweep goes on
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch

from bench.speed.methods import TIMED_METHODS, Case, measure
from bench.speed.rigs import Rig

MEASURED_FIELDS = ("ttft_ms", "compress_ms", "prefill_ms", "first_token_ms", "other_ms", "decode_ms",
                   "tokens_per_s", "peak_mem_bytes", "peak_mem_above_weights_bytes", "kv_cache_bytes", "positions")


@dataclass
class Plan:
    lengths: list[int]
    ratios: list[int]
    methods: list[str]
    runs: int = 3
    new_tokens: int = 16
    budget_s: float = 14 * 60  # from the start of the process
    max_repeat_s: float = 60.0  # a point whose first run took longer is not repeated
    max_length: dict[str, int] = field(default_factory=dict)  # method -> longest length at the main ratio
    sweep_max_length: dict[str, int] = field(default_factory=dict)  # method -> longest length at other ratios
    memory_limit_bytes: int | None = None  # None: the device's own
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(TIMED_METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; known: {sorted(TIMED_METHODS)}")
        if not self.lengths or min(self.lengths) < 1 or not self.ratios or min(self.ratios) < 1 or self.runs < 1:
            raise ValueError("lengths, ratios and runs must be positive")
        self.lengths, self.ratios = sorted(set(self.lengths)), sorted(set(self.ratios))

    @property
    def main_ratio(self) -> int:
        return max(self.ratios)

    def planned(self, method: str, ratio: int | None, length: int) -> bool:
        caps = self.max_length if ratio in (None, self.main_ratio) else {**self.max_length, **self.sweep_max_length}
        return length <= caps.get(method, length)


@dataclass
class Point:
    method: str
    ratio: int | None
    tokens: int
    status: str = "pending"
    reason: str = ""
    samples: list[dict] = field(default_factory=list)
    first_run_s: float = 0.0
    predicted_bytes: int = 0  # for does_not_fit: the predicted peak above the weights

    @property
    def key(self) -> tuple:
        return (self.method, self.ratio, self.tokens)

    def median(self) -> dict:
        return {f: statistics.median(s[f] for s in self.samples) for f in MEASURED_FIELDS} if self.samples else {}

    def extra(self) -> dict:
        """Per-request extras (latents, positions held), from the last sample."""
        return {k: v for k, v in self.samples[-1].items() if k not in MEASURED_FIELDS and k not in ("device",
                "new_tokens")} if self.samples else {}


def free_memory(device: torch.device, limit: int | None, weights: int) -> int:
    """Bytes a request may use above the weights: the plan's limit or the GPU's memory, less the
    weights; on a CPU the memory available now (the weights are already resident)."""
    if limit is not None:
        return limit - weights
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory - weights
    return psutil.virtual_memory().available


def predicted_bytes(rig: Rig, points: dict, method: str, positions: int, new_tokens: int) -> int:
    """Peak memory above the weights of a request that reaches `positions` decoder positions: the
    largest measured bytes per position reached of this method so far, or (before any) the KV
    cache plus one layer's activations per position. Positions reached, not `positions` kept:
    a press prefills the whole context before it drops most of it."""
    element = torch.empty((), dtype=rig.dtype).element_size()
    shape = rig.decoder_shape
    per_position = shape.kv_bytes_per_token(element) + element * (
        3 * shape.intermediate + 4 * shape.hidden + 2 * shape.heads * shape.head_dim)
    for point in points.values():
        if point.method == method and point.samples:
            reached = TIMED_METHODS[method].positions_needed(rig, point.tokens, point.ratio, new_tokens)
            per_position = max(per_position, point.median()["peak_mem_above_weights_bytes"] / reached)
    return int(per_position * positions)


class Sweep:
    def __init__(self, rig: Rig, plan: Plan, started: float, say: Callable[[str], None] = print,
                 on_progress: Callable[["Sweep"], None] | None = None):
        self.rig, self.plan, self.started, self.say, self.on_progress = rig, plan, started, say, on_progress
        self.points: dict[tuple, Point] = {}
        self.cases: dict[tuple, Case] = {}
        self.free = free_memory(rig.device, plan.memory_limit_bytes, rig.weights_bytes())
        for length in plan.lengths:
            for method in plan.methods:
                for ratio in (plan.ratios if TIMED_METHODS[method].uses_ratio else [None]):
                    point = Point(method, ratio, length)
                    self.points[point.key] = point

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def restore(self, records: list[dict]) -> int:
        """Take over the finished points of an earlier call's records (same rig and plan keys):
        measured ones keep their samples, and the ones that cannot run keep their status; points
        that were over budget or pending run again. Returns the points taken over."""
        done = 0
        for r in records:
            point = self.points.get((r["method"], r["ratio"], r["tokens"]))
            if point is None or r["status"] in ("pending", "over_budget", "not_planned") or \
                    (r["status"] == "ok" and not r.get("samples")):
                continue
            point.status, point.reason = r["status"], r.get("reason", "")
            point.samples, point.first_run_s = list(r.get("samples", [])), r.get("first_run_s", 0.0)
            point.predicted_bytes = r.get("predicted_peak_above_weights_bytes", 0)
            done += 1
        return done

    def predicted_s(self, point: Point) -> float:
        """Seconds of one run of `point`, from the first runs of the same method and ratio at
        shorter lengths: the growth between the last two (between linear and quadratic in the
        length), or linear from one; 0 when none was measured."""
        shorter = sorted((p.tokens, p.first_run_s) for p in self.points.values() if p.method == point.method
                         and p.ratio == point.ratio and p.tokens < point.tokens and p.samples and p.first_run_s > 0)
        if not shorter:
            return 0.0
        tokens, seconds = shorter[-1]
        power = 1.0
        if len(shorter) > 1:
            (t0, s0), (t1, s1) = shorter[-2], shorter[-1]
            power = min(2.0, max(1.0, math.log(s1 / s0) / math.log(t1 / t0))) if s1 > s0 else 1.0
        return seconds * (point.tokens / tokens) ** power

    @staticmethod
    def case_key(point: Point) -> tuple:
        """Points that share a document (and, for cached latents, its latents) share a case."""
        return (point.tokens, point.ratio, point.method if point.method in ("lclm_cached", "full_followup",
                                                                           "lclm_followup") else "")

    def case(self, point: Point) -> Case:
        key = self.case_key(point)
        if key not in self.cases:
            doc = self.rig.document(point.tokens, seed=self.plan.seed + point.tokens)
            self.cases[key] = Case(point.tokens, point.ratio, doc)
        return self.cases[key]

    # ---- checks before a point runs --------------------------------------------------------
    def check(self, point: Point) -> None:
        """Set the status of a pending point that cannot or need not run: memory first (a
        full-context point beyond the plan's caps still says whether it would fit), then
        positions, then the plan's caps."""
        method = TIMED_METHODS[point.method]
        positions = method.positions_needed(self.rig, point.tokens, point.ratio, self.plan.new_tokens)
        too_many = self.rig.max_positions and positions > self.rig.max_positions
        beyond = f"needs {positions:,} positions; the decoder has {self.rig.max_positions:,}" if too_many else ""
        shorter_oom = [p for p in self.points.values() if p.method == point.method and p.ratio == point.ratio
                       and p.tokens < point.tokens and p.status == "oom"]
        if shorter_oom:
            point.status, point.reason = "does_not_fit", f"ran out of memory at {shorter_oom[0].tokens:,} tokens"
        elif method.prefills_context and (need := predicted_bytes(self.rig, self.points, point.method, positions,
                                                                  self.plan.new_tokens)) > self.free:
            point.status, point.predicted_bytes = "does_not_fit", need
            point.reason = f"needs about {need / 2**30:.1f} GiB above the weights; {self.free / 2**30:.1f} GiB free"
            point.reason += f" (and {beyond})" if beyond else ""
        elif too_many:
            point.status, point.reason = "exceeds_max_positions", beyond
        elif not self.plan.planned(point.method, point.ratio, point.tokens):
            point.status, point.reason = "not_planned", "beyond this plan's length cap for the method (time)"

    # ---- running ---------------------------------------------------------------------------
    def run_point(self, point: Point, warm_up: bool = False) -> None:
        case = self.case(point)
        began = time.perf_counter()
        try:
            m = measure(self.rig, TIMED_METHODS[point.method], case, self.plan.new_tokens)
        except torch.OutOfMemoryError as err:
            point.status, point.reason = "oom", str(err).split("\n")[0][:200]
            self.cases.pop(self.case_key(point), None)
            if self.rig.device.type == "cuda":
                torch.cuda.empty_cache()
            self.say(f"[{self.elapsed():7.1f}s] {point.method} {self.ratio_text(point)} {point.tokens:,}: "
                     "out of memory")
            return
        except Exception as err:  # a method's own failure (e.g. a press on an odd model) must not end the sweep
            point.status, point.reason = "error", f"{type(err).__name__}: {err}"[:300]
            self.say(f"[{self.elapsed():7.1f}s] {point.method} {self.ratio_text(point)} {point.tokens:,}: "
                     f"{point.reason}")
            return
        seconds = time.perf_counter() - began
        if warm_up:
            self.say(f"[{self.elapsed():7.1f}s] warm-up {point.tokens:>9,} tokens  {point.method:<11} "
                     f"{self.ratio_text(point)}")
            return
        if not point.samples:
            point.first_run_s = seconds
        point.samples.append(m.to_dict())
        point.status = "ok"
        self.say(f"[{self.elapsed():7.1f}s] run {len(point.samples)}  {point.tokens:>9,} tokens  "
                 f"{point.method:<11} {self.ratio_text(point):<5} ttft {m.ttft_ms:>10,.1f} ms  "
                 f"peak+{m.peak_mem_above_weights_bytes / 2**20:>9,.1f} MiB")

    @staticmethod
    def ratio_text(point: Point) -> str:
        return f"1:{point.ratio}" if point.ratio else "-"

    def warm_up(self) -> None:
        """One untimed request per method, at the shortest length it runs at."""
        for method in self.plan.methods:
            for point in sorted(self.points.values(), key=lambda p: p.tokens):
                if point.method != method or point.status != "pending":
                    continue
                self.check(point)
                if point.status == "pending":
                    self.run_point(point, warm_up=True)  # its numbers are not kept
                    break

    def run(self) -> dict[tuple, Point]:
        self.warm_up()
        for rep in range(self.plan.runs):
            self.run_round(rep)
        return self.points

    def run_round(self, rep: int) -> None:
        """Run `rep` (from 0) of every point that still runs (the sweep's runs are rounds of these):
        points measured that often in an earlier call are skipped, and a point predicted to end past
        the time budget is not started."""
        for length in self.plan.lengths:
            for point in [p for p in self.points.values() if p.tokens == length]:
                if point.status == "pending":
                    self.check(point)
                if point.status not in ("pending", "ok"):
                    continue
                if point.status == "ok" and point.first_run_s > self.plan.max_repeat_s:
                    continue  # one run of this point is long enough to stand alone
                if len(point.samples) > rep:
                    continue  # measured in an earlier call
                predicted = point.first_run_s if point.samples else self.predicted_s(point)
                if self.elapsed() + predicted > self.plan.budget_s:
                    if point.status == "pending":
                        point.status = "over_budget"
                        point.reason = (f"one run predicted to take {predicted:.0f} s; "
                                        f"{max(0.0, self.plan.budget_s - self.elapsed()):.0f} s were left")
                    continue
                self.run_point(point)
        if self.on_progress:
            self.on_progress(self)
