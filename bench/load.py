"""Bounded load test of the studio, on loopback only: N concurrent gradio_client sessions, each
with its own generated document, ask a fixed number of questions; it stops by itself.

    python -m bench.load [--sessions 4] [--questions 2] [--rounds 3] [--checkpoint DIR ...]
                         [--url http://127.0.0.1:P/ --pid PID --family embedded|checkpoint]
    python -m bench.load --users 1 4 16 32 --decoders transformers vllm [--doc-tokens 4000]

With --users it measures throughput instead (`sweep`): for each decoder backend a studio is
started (`app.py --decoder ...`), and for each number of users and each scenario (LCLM alone;
LCLM with the full-context answer beside it, the studio's comparison) every user loads a
document of its own and they all ask at once: answers per minute, the time each user waits for
the first token of each answer (p50, p95), the server's TTFT for each method, and the peak RSS
of the studio with its vLLM servers. Results: bench/results/load-sweep.{json,md,png}.

Without --url it starts `python app.py` on 127.0.0.1 (the embedded default, or the checkpoints
given) and stops it at the end. First every (document, question) is answered by a single user,
one at a time (greedy decoding: the reference answers); then all sessions ask at once. Every
request must complete (the model slot runs one at a time, so the others wait and are told their
queue position), and every answer must equal the single-user one. The concurrent phase runs
`--rounds` times; the server's RSS is read before it (after the single-user phase has warmed the
server up) and after each round.
Results go to bench/results/load.json."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from app.engine.decoder_server import free_port
from model.precision import cpu_name

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = ("embedded SmolLM2-135M", 16, "mean")  # family, ratio, pooling
CHECKPOINT_MODEL = ("--checkpoint", 4, "mean")
QUESTIONS = ("What is the code of this report?", "Which city is the report about?", "What is this document about?")
WORDS = ("river market winter harbour council bridge station garden library museum budget school road "
         "train festival weather report survey engine field forest").split()
CITIES = ("Lisbon", "Oslo", "Quito", "Perth", "Accra", "Hanoi", "Lima", "Riga")
MIB = 2**20


def document(number: int, sentences: int = 12) -> str:
    """A different, reproducible document per number, with a code and a city to ask about."""
    rng = random.Random(number)
    body = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 10))).capitalize() + "." for _ in range(sentences)]
    body.insert(sentences // 2, f"The code of this report is {1000 + 37 * number}.")
    return f"Report {number} from {CITIES[number % len(CITIES)]}. " + " ".join(body)


@dataclass
class Answer:
    session: int
    question: str
    answer: str
    latency_s: float
    queue_positions: list[int] = field(default_factory=list)  # ranks seen while queued, in order


def ask(client, model: tuple, question: str, max_new_tokens: int, session: int, timeout_s: float) -> Answer:
    """One streamed /ask, its queue positions recorded from the status updates."""
    from gradio_client.utils import Status

    start = time.perf_counter()
    job = client.submit(*model, question, "lclm", False, "none", max_new_tokens, api_name="/ask")
    ranks: list[int] = []
    while not job.done():
        status = job.status()
        if status.code == Status.IN_QUEUE and status.rank is not None and (not ranks or ranks[-1] != status.rank):
            ranks.append(status.rank)
        if time.perf_counter() - start > timeout_s:
            job.cancel()
            raise TimeoutError(f"session {session}: no answer within {timeout_s:.0f} s")
        time.sleep(0.02)
    job.result(timeout=timeout_s)
    return Answer(session, question, job.outputs()[-1][0], time.perf_counter() - start, ranks)


def session(url: str, number: int, model: tuple, questions: list[str], max_new_tokens: int,
            timeout_s: float, start: threading.Barrier | None = None) -> list[Answer]:
    """A gradio_client session of its own: load document `number`, then ask each question."""
    from gradio_client import Client

    client = Client(url, verbose=False, analytics_enabled=False)
    client.predict(document(number), None, *model, api_name="/load_document")
    if start is not None:
        start.wait(timeout_s)
    return [ask(client, model, q, max_new_tokens, number, timeout_s) for q in questions]


def long_document(number: int, tokens: int) -> str:
    """Document `number` grown to about `tokens` decoder tokens (about 11 per sentence)."""
    return document(number, sentences=max(12, tokens // 11))


def text_of(update) -> str:
    return (update.get("value") or "") if isinstance(update, dict) else (update or "")


ANSWER_BOXES = {"lclm": 0, "full": 1}  # the Ask tab's answer boxes in /ask's outputs; 7: the results JSON


def timed_ask(client, model: tuple, question: str, with_full: bool, max_new_tokens: int, timeout_s: float) -> dict:
    """One streamed /ask; the seconds until each answer box shows its first text, until the end,
    and the server's own TTFT per method."""
    start = time.perf_counter()
    job = client.submit(*model, question, "lclm", with_full, "none", max_new_tokens, api_name="/ask")
    first: dict[str, float] = {}
    boxes = {k: i for k, i in ANSWER_BOXES.items() if k == "lclm" or with_full}
    while not job.done():
        outputs = job.outputs()
        if outputs:
            for key, index in boxes.items():
                if key not in first and text_of(outputs[-1][index]).strip():
                    first[key] = time.perf_counter() - start
        if time.perf_counter() - start > timeout_s:
            job.cancel()
            raise TimeoutError(f"no answer within {timeout_s:.0f} s")
        time.sleep(0.02)
    job.result(timeout=timeout_s)
    end = time.perf_counter() - start
    final = job.outputs()[-1]
    results = final[7] if isinstance(final[7], dict) else {}
    return {"first_token_s": {k: first.get(k, end) for k in boxes}, "latency_s": end,
            "server_ttft_ms": {name: r.get("ttft_ms") for name, r in results.items() if isinstance(r, dict)},
            "answers": {k: text_of(final[i]) for k, i in boxes.items()}}


class PeakRSS:
    """The largest RSS of a process and its children, sampled every `interval_s` while in a `with`."""

    def __init__(self, pid: int, interval_s: float = 0.25):
        self.pid, self.interval_s, self.peak, self._stop = pid, interval_s, 0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss(self.pid))
            except psutil.Error:
                pass
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def load_point(url: str, pid: int, model: tuple, users: int, with_full: bool, questions: list[str],
               doc_tokens: int, first_doc: int, max_new_tokens: int, timeout_s: float) -> dict:
    """`users` sessions, each with its own document, ask `questions` all at once."""
    from gradio_client import Client

    clients = []
    for n in range(users):  # loaded first, one by one: the measured phase is the asking
        client = Client(url, verbose=False, analytics_enabled=False)
        client.predict(long_document(first_doc + n, doc_tokens), None, *model, api_name="/load_document")
        clients.append(client)
    barrier = threading.Barrier(users)

    def user(client) -> list[dict]:
        barrier.wait(timeout_s)
        return [timed_ask(client, model, q, with_full, max_new_tokens, timeout_s) for q in questions]

    with PeakRSS(pid) as peak, ThreadPoolExecutor(users) as pool:
        started = time.perf_counter()
        asked = [a for f in [pool.submit(user, c) for c in clients] for a in f.result(timeout=timeout_s * 4)]
        wall_s = time.perf_counter() - started
    out = {"users": users, "scenario": "LCLM + full context" if with_full else "LCLM", "requests": len(asked),
           "answers_per_minute": round(len(asked) * (2 if with_full else 1) / wall_s * 60, 2),
           "wall_s": round(wall_s, 2), "peak_rss_mib": round(peak.peak / MIB, 1),
           "empty_answers": sum(not a["answers"][k].strip() for a in asked for k in a["answers"])}
    for key in ANSWER_BOXES if with_full else ("lclm",):
        waits = [a["first_token_s"][key] for a in asked]
        out[f"{key}_first_token_s"] = {"p50": round(percentile(waits, 0.5), 3),
                                       "p95": round(percentile(waits, 0.95), 3)}
    server = [v for a in asked for v in a["server_ttft_ms"].values() if v is not None]
    out["server_ttft_ms_median"] = round(statistics.median(server), 1) if server else None
    return out


def sweep(decoders: list[str], users: list[int], doc_tokens: int = 4000, questions: int = 1,
          max_new_tokens: int = 16, timeout_s: float = 1800.0, checkpoints: list[str] = ()) -> dict:
    """Every backend x number of users x scenario (LCLM alone, LCLM with full context beside it)."""
    model = CHECKPOINT_MODEL if checkpoints else EMBEDDED_MODEL
    asked = [QUESTIONS[i % len(QUESTIONS)] for i in range(questions)]
    points, doc = [], 0
    for decoder in decoders:
        process, url = launch(list(checkpoints), extra=["--decoder", decoder],
                              env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")})
        try:
            # warm-up: loads the models and, with vLLM, starts the servers of both decoders
            load_point(url, process.pid, model, 1, True, asked[:1], doc_tokens, 10_000, max_new_tokens, timeout_s)
            for n in users:
                for with_full in (False, True):
                    point = load_point(url, process.pid, model, n, with_full, asked, doc_tokens, doc,
                                       max_new_tokens, timeout_s)
                    doc += n
                    points.append({"decoder": decoder, **point})
                    print(json.dumps(points[-1]), flush=True)
        finally:
            process.terminate()
            process.wait(60)
    return {"model": list(model), "doc_tokens": doc_tokens, "questions_per_user": questions,
            "max_new_tokens": max_new_tokens, "points": points}


def rss(pid: int) -> int:
    """Resident memory of the server process and its children."""
    process = psutil.Process(pid)
    return process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))


def run(url: str, pid: int, model: tuple = EMBEDDED_MODEL, sessions: int = 4, questions: int = 2,
        max_new_tokens: int = 16, timeout_s: float = 600.0, rounds: int = 1) -> dict:
    """The load test against the studio at `url` (served by process `pid`); returns the results.
    The concurrent phase runs `rounds` times, new sessions each time, with the RSS read after each:
    memory that a leak holds grows round after round, memory that warms up once does not."""
    if not url.startswith(("http://127.0.0.1", "http://localhost")):
        raise ValueError(f"the load test runs on loopback only, not {url}")
    asked = [QUESTIONS[i % len(QUESTIONS)] for i in range(questions)]
    rss_start = rss(pid)
    single = [a for n in range(sessions) for a in session(url, n, model, asked, max_new_tokens, timeout_s)]
    reference = {(a.session, a.question): a.answer for a in single}
    rss_before = rss(pid)
    started = time.perf_counter()
    concurrent, rss_rounds = [], []
    for _ in range(rounds):
        barrier = threading.Barrier(sessions)  # every session has loaded its document: ask all at once
        with ThreadPoolExecutor(sessions) as pool:
            futures = [pool.submit(session, url, n, model, asked, max_new_tokens, timeout_s, barrier)
                       for n in range(sessions)]
            concurrent += [a for f in futures for a in f.result(timeout=timeout_s * (questions + 1))]
        rss_rounds.append(rss(pid))
    wall_s = time.perf_counter() - started
    rss_after = rss_rounds[-1]
    mismatches = [asdict(a) | {"expected": reference[a.session, a.question]} for a in concurrent
                  if a.answer != reference[a.session, a.question]]
    queued = [a for a in concurrent if a.queue_positions]
    return {
        "model": list(model), "sessions": sessions, "questions_per_session": questions, "rounds": rounds,
        "max_new_tokens": max_new_tokens, "requests": len(concurrent), "completed": len(concurrent),
        "answers_match_single_user": not mismatches, "mismatches": mismatches,
        "requests_queued": len(queued),
        "max_queue_position": max((p for a in queued for p in a.queue_positions), default=None),
        "latency_median_s": {"single_user": round(statistics.median(a.latency_s for a in single), 3),
                             "concurrent": round(statistics.median(a.latency_s for a in concurrent), 3)},
        "latency_max_s": {"single_user": round(max(a.latency_s for a in single), 3),
                          "concurrent": round(max(a.latency_s for a in concurrent), 3)},
        "concurrent_wall_s": round(wall_s, 3),
        "server_rss_mib": {"start": round(rss_start / MIB, 1), "before": round(rss_before / MIB, 1),
                           "after": round(rss_after / MIB, 1), "growth": round((rss_after - rss_before) / MIB, 1),
                           "after_each_round": [round(r / MIB, 1) for r in rss_rounds],
                           "growth_after_the_first_round": round((rss_after - rss_rounds[0]) / MIB, 1)},
        "answers": [asdict(a) for a in concurrent],
    }


def launch(checkpoints: list[str], timeout_s: float = 300.0, extra: list[str] = (),
           env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`python app.py` on 127.0.0.1 and a free port; returns (process, url) once it serves."""
    args = [a for c in checkpoints for a in ("--checkpoint", c)] + list(extra)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(free_port()), *args],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: list[str] = []

    def read() -> None:
        for line in process.stdout:
            if line.startswith("LCLM Studio at ") and not found:
                found.append(line.split(" at ", 1)[1].strip())

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not found and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not found:
        process.kill()
        raise RuntimeError("the studio did not start")
    return process, found[0]


def sweep_markdown(result: dict, cpu: str) -> str:
    def spread(waits: dict | None) -> str:
        return f"{waits['p50']:.2f} / {waits['p95']:.2f}" if waits else "-"

    rows = ["| decoder | users | scenario | answers / min | LCLM first token p50 / p95 s "
            "| full context first token p50 / p95 s | server TTFT median ms | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        rows.append(f"| {p['decoder']} | {p['users']} | {p['scenario']} | {p['answers_per_minute']:.1f} "
                    f"| {spread(p['lclm_first_token_s'])} | {spread(p.get('full_first_token_s'))} "
                    f"| {p['server_ttft_ms_median']} | {p['peak_rss_mib']:,.0f} |")
    return (f"# Load: many users at once\n\n{cpu}; model {' '.join(map(str, result['model']))}; documents of about "
            f"{result['doc_tokens']:,} tokens, {result['questions_per_user']} question(s) per user, "
            f"{result['max_new_tokens']} new tokens.\n\n" + "\n".join(rows) + "\n")


def sweep_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, wait) = plt.subplots(1, 2, figsize=(11, 4))
    lines = sorted({(p["decoder"], p["scenario"]) for p in result["points"]})
    for decoder, scenario in lines:
        pts = [p for p in result["points"] if (p["decoder"], p["scenario"]) == (decoder, scenario)]
        users = [p["users"] for p in pts]
        rate.plot(users, [p["answers_per_minute"] for p in pts], marker="o", label=f"{decoder}: {scenario}")
        wait.plot(users, [p["lclm_first_token_s"]["p95"] for p in pts], marker="o", label=f"{decoder}: {scenario}")
    for ax, title in ((rate, "answers per minute"), (wait, "LCLM first token p95 (s, as the user waits)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("users asking at once")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    rate.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a studio already running on 127.0.0.1 (with --pid)")
    parser.add_argument("--pid", type=int, help="the process id of the studio at --url, for its RSS")
    parser.add_argument("--checkpoint", action="append", default=[], help="passed to app.py when launching it")
    parser.add_argument("--family", choices=("embedded", "checkpoint"), default=None,
                        help="the model family to ask (default: checkpoint when --checkpoint is given, else embedded)")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--questions", type=int, default=2, help="questions per session")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="times the concurrent phase runs")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for any one request")
    parser.add_argument("--out", default=None,
                        help="default: bench/results/load.json, with --users bench/results/load-sweep.json")
    parser.add_argument("--users", type=int, nargs="+", default=None,
                        help="measure throughput at these numbers of users asking at once (sweep)")
    parser.add_argument("--decoders", nargs="+", choices=("transformers", "vllm"), default=["transformers", "vllm"],
                        help="with --users: the studio's decoder backends to compare")
    parser.add_argument("--doc-tokens", type=int, default=4000, help="with --users: tokens per user's document")
    args = parser.parse_args(argv)
    if args.users:
        out = Path(args.out or ROOT / "bench" / "results" / "load-sweep.json")
        result = sweep(args.decoders, args.users, args.doc_tokens, args.questions, args.max_new_tokens,
                       args.timeout, args.checkpoint)
        cpu = f"{cpu_name()}, {os.cpu_count()} CPUs"
        result["cpu"] = cpu
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(sweep_markdown(result, cpu))
        sweep_plot(result, out.with_suffix(".png"))
        print(sweep_markdown(result, cpu))
        return 0
    args.out = args.out or str(ROOT / "bench" / "results" / "load.json")
    if bool(args.url) != bool(args.pid):
        parser.error("--url and --pid go together")
    family = args.family or ("checkpoint" if args.checkpoint else "embedded")
    model = CHECKPOINT_MODEL if family == "checkpoint" else EMBEDDED_MODEL
    process = None
    if args.url is None:
        process, args.url = launch(args.checkpoint)
        args.pid = process.pid
    try:
        result = run(args.url, args.pid, model, args.sessions, args.questions, args.max_new_tokens, args.timeout,
                     args.rounds)
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
    result["cpus"] = os.cpu_count()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k not in ("answers", "mismatches")}
    print(json.dumps(summary, indent=2))
    return 0 if result["answers_match_single_user"] else 1


if __name__ == "__main__":
    sys.exit(main())
