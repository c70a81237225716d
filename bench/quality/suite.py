"""What the quality harness measures.

- fidelity: per ratio and pooling, spans of validation text are compressed and the decoder
  reproduces them (Studio.reconstruct, the app's own code path); token accuracy, BLEU and
  ROUGE-L against the original.
- ruler: the synthetic suite (model/training/data/synthetic.py) generated with evaluation
  seeds at several context lengths; every method answers every example through the studio's
  own method registry (app/engine/methods.py, `Studio.ask`); the score is the
  share of answers found in the reply (case-insensitive substring match). Questions use one
  prompt profile (`paper` by default: the authors' layout and EXPAND agent), and each EXPAND
  case records the rounds it used and the chunks it read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from app.engine.methods import METHODS as STUDIO_METHODS
from app.engine.methods import PRESS_METHODS
from app.engine.service import AskRequest, Studio
from bench.quality.metrics import bleu, rouge_l
from model.training.data.synthetic import Haystack, TaskExample, eval_seed, make_task, score


@dataclass(frozen=True)
class ScoredMethod:
    """One row of the RULER table: a studio method (app.engine.methods.METHODS, by `kind`: full, lclm,
    expand or a press's name) at one ratio and pooling."""

    name: str
    kind: str
    ratio: int = 1
    pooling: str = "mean"

    @property
    def is_press(self) -> bool:
        return self.kind in PRESS_METHODS

    @property
    def reads_latents(self) -> bool:
        return STUDIO_METHODS[self.kind].reads_latents

    @property
    def family(self) -> str:
        """The plot line this method belongs to."""
        if self.kind == "expand":
            return f"LCLM 1:{self.ratio} + EXPAND"
        if self.reads_latents:  # one line per pooling across the ratios
            return f"{STUDIO_METHODS[self.kind].label} {self.pooling}"
        return STUDIO_METHODS[self.kind].label


def methods(ratios: list[int], poolings: list[str], presses: list[str], expand_ratio: int = 16) -> list[ScoredMethod]:
    unknown = [p for p in presses if p not in PRESS_METHODS]
    if unknown:
        raise ValueError(f"unknown presses {unknown}; known: {', '.join(PRESS_METHODS)}")
    out = [ScoredMethod("full context", "full")]
    # any other registered method that reads the text and is not a press: one row, as full context
    out += [ScoredMethod(m.label, name) for name, m in STUDIO_METHODS.items()
            if m.reads_text and name != "full" and name not in PRESS_METHODS]
    # every method that reads latents: at each ratio and pooling asked for; EXPAND at its one ratio, mean
    for name, m in STUDIO_METHODS.items():
        if not m.reads_latents:
            continue
        if name == "expand":
            if expand_ratio:
                out.append(ScoredMethod(m.run_name(f"1:{expand_ratio} mean"), name, expand_ratio, "mean"))
            continue
        out += [ScoredMethod(m.run_name(f"1:{n} {p}"), name, n, p) for p in poolings for n in ratios]
    for press in presses:
        if STUDIO_METHODS[press].uses_ratio:
            out += [ScoredMethod(f"{press} 1:{n}", press, n) for n in ratios]
        else:  # every position kept: no ratio, once
            out.append(ScoredMethod(press, press, 1))
    return out


def ruler_examples(haystack: Haystack, tasks: list[str], lengths: list[int],
                   samples: int) -> list[tuple[int, TaskExample]]:
    """The evaluation suite: (context length, example), `samples` per task and length, from evaluation seeds only."""
    return [(length, make_task(task, eval_seed(task, length, i), haystack, length))
            for length in lengths for task in tasks for i in range(samples)]


def answer(studio: Studio, method: ScoredMethod, example: TaskExample, max_new_tokens: int,
           prompt_profile: str = "paper",
           expand_new_tokens: int | None = None) -> dict:
    """One method on one example: reply, decoder positions, the prompt profile and, for EXPAND,
    the rounds used and the chunks read (numbered from 1)."""
    if STUDIO_METHODS[method.kind].reads_latents:
        tokens = expand_new_tokens if method.kind == "expand" else max_new_tokens  # None: 256 per EXPAND round
        asked = AskRequest(example.context, example.question, method=method.kind, ratio=method.ratio,
                           pooling=method.pooling, max_new_tokens=tokens, use_cache=False,
                           prompt_profile=prompt_profile)
        events = list(studio.ask(asked))
    else:  # full context and the presses read the raw text with the default variant's decoder
        variant = studio.variant(prompt_profile=prompt_profile)
        request = studio.request(example.context, example.question, variant, max_new_tokens, use_cache=False,
                                 ratio=method.ratio if method.is_press else None)
        events = list(studio.run(method.kind, request))
    done = events[-1].answer
    out = {"reply": done.text, "positions": done.measurement.positions, "prompt_profile": done.prompt_profile}
    trace = done.expand
    if trace is not None:
        holding = sorted({c["index"] for c in trace.chunks for at in example.answer_offsets
                          if c["start_char"] <= at < c["end_char"]})
        first = next((r["expanded"] for r in trace.rounds if r["expanded"]), [])
        out.update(rounds=len(trace.rounds), expanded=trace.expanded, chunks=len(trace.chunks),
                   holding=holding, first_expanded=first)
    return out


def run_ruler(studio: Studio, all_methods: list[ScoredMethod], examples: list[tuple[int, TaskExample]],
              max_new_tokens: int, on_record: Callable[[dict], None] | None = None, prompt_profile: str = "paper",
              expand_new_tokens: int | None = None) -> list[dict]:
    records = []
    bar = tqdm(total=len(all_methods) * len(examples), desc="ruler", unit="answer")
    for method in all_methods:
        for index, (length, example) in enumerate(examples):
            started = time.perf_counter()
            got = answer(studio, method, example, max_new_tokens, prompt_profile, expand_new_tokens)
            reply = got.pop("reply")
            kind = "press" if method.is_press else method.kind
            record = {"method": method.name, "family": method.family, "kind": kind, "ratio": method.ratio,
                      "pooling": method.pooling if method.reads_latents else None,
                      **({"press": method.kind} if method.is_press else {}),
                      "task": example.kind, "length": length, "example": index, "depth": round(example.depth, 3),
                      "score": score(example, reply), "reply": reply[:200], "answers": example.answers,
                      **got, "seconds": round(time.perf_counter() - started, 2)}
            records.append(record)
            if on_record:
                on_record(record)
            bar.update(1)
    bar.close()
    return records


def run_fidelity(studio: Studio, texts: list[str], ratios: list[int], poolings: list[str]) -> list[dict]:
    rows = []
    bar = tqdm(total=len(ratios) * len(poolings) * len(texts), desc="fidelity", unit="span")
    for pooling in poolings:
        for ratio in ratios:
            references, hypotheses, accuracies, weights = [], [], [], []
            for text in texts:
                result = studio.reconstruct(text, ratio=ratio, pooling=pooling, use_cache=False, max_chunks=1,
                                            chunk_tokens=studio.settings.chunk_tokens)  # EXPAND's chunk, 256
                chunk = result["chunks"][0]
                references.append(chunk["original"])
                hypotheses.append(chunk["reconstructed"])
                accuracies.append(chunk["token_accuracy"])
                weights.append(chunk["reference_tokens"])
                bar.update(1)
            rows.append({
                "ratio": ratio, "pooling": pooling, "spans": len(texts), "trained": result["trained"],
                "checkpoint": result["checkpoint"],
                "token_accuracy": round(sum(a * w for a, w in zip(accuracies, weights)) / sum(weights), 4),
                "bleu": round(bleu(references, hypotheses), 2),
                "rouge_l": round(sum(rouge_l(r, h) for r, h in zip(references, hypotheses)) / len(texts), 4),
                "example": {"original": references[0][:300], "reconstructed": hypotheses[0][:300]},
            })
    bar.close()
    return rows
