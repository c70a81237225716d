"""What the quality harness measures.

- fidelity: per ratio and pooling, spans of validation text are compressed and the decoder
  reproduces them (Studio.reconstruct, the app's own code path); token accuracy, BLEU and
  ROUGE-L against the original.
- ruler: the synthetic suite (model/training/data/synthetic.py) generated with evaluation
  seeds at several context lengths; every method answers every example; the score is the
  share of answers found in the reply (case-insensitive substring match). Questions use one
  prompt profile (`paper` by default: the authors' layout and EXPAND agent), and each EXPAND
  case records the rounds it used and the chunks it read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from app.service import Studio
from bench.quality.metrics import bleu, rouge_l
from model.baselines import press_answer
from model.prompts import PROMPT_PROFILES
from model.training.data.synthetic import Haystack, TaskExample, eval_seed, make_task, score


@dataclass(frozen=True)
class Method:
    """One row of the RULER table: `kind` is full, lclm, expand or press."""

    name: str
    kind: str
    ratio: int = 1
    pooling: str = "mean"
    press: str = ""

    @property
    def family(self) -> str:
        """The plot line this method belongs to."""
        if self.kind == "lclm":
            return f"LCLM {self.pooling}"
        if self.kind == "press":
            return {"snapkv": "SnapKV", "kvzip": "KVzip", "expected_attention": "ExpectedAttention",
                    "attention_matching": "Attention Matching", "quantized_4bit": "KV 4-bit",
                    "quantized_2bit": "KV 2-bit"}.get(self.press, self.press)
        return {"full": "full context", "expand": f"LCLM 1:{self.ratio} + EXPAND"}[self.kind]


def methods(ratios: list[int], poolings: list[str], presses: list[str], expand_ratio: int = 16) -> list[Method]:
    out = [Method("full context", "full")]
    out += [Method(f"LCLM 1:{n} {p}", "lclm", n, p) for p in poolings for n in ratios]
    if expand_ratio:
        out.append(Method(f"LCLM 1:{expand_ratio} mean + EXPAND", "expand", expand_ratio, "mean"))
    quantized = [p for p in presses if p.startswith("quantized_")]  # every position kept: no ratio, once each
    out += [Method(f"{press} 1:{n}", "press", n, press=press) for press in presses if press not in quantized
            for n in ratios]
    out += [Method(press, "press", 1, press=press) for press in quantized]
    return out


def ruler_examples(haystack: Haystack, tasks: list[str], lengths: list[int],
                   samples: int) -> list[tuple[int, TaskExample]]:
    """The evaluation suite: (context length, example), `samples` per task and length, from evaluation seeds only."""
    return [(length, make_task(task, eval_seed(task, length, i), haystack, length))
            for length in lengths for task in tasks for i in range(samples)]


def answer(studio: Studio, method: Method, example: TaskExample, max_new_tokens: int, prompt_profile: str = "paper",
           expand_new_tokens: int | None = None) -> dict:
    """One method on one example: reply, decoder positions, the prompt profile and, for EXPAND,
    the rounds used and the chunks read (numbered from 1)."""
    if method.kind == "press":
        model = studio.model()  # any variant: only its decoder is used
        result = press_answer(model.decoder, model.decoder_tokenizer, example.context, example.question,
                              method.press, method.ratio, max_new_tokens, PROMPT_PROFILES[prompt_profile].question)
        return {"reply": result.answer, "positions": result.positions, "prompt_profile": prompt_profile}
    ratio = None if method.kind == "full" else method.ratio
    pooling = None if method.kind == "full" else method.pooling
    tokens = expand_new_tokens if method.kind == "expand" else max_new_tokens  # None: 256 per EXPAND round
    events = list(studio.ask(example.context, example.question, mode=method.kind, ratio=ratio, pooling=pooling,
                             max_new_tokens=tokens, use_cache=False, prompt_profile=prompt_profile))
    done = events[-1].result
    out = {"reply": done["answer"], "positions": done["positions"], "prompt_profile": done["prompt_profile"]}
    if method.kind == "expand":
        out.update(rounds=len(done["rounds"]), expanded=done["expanded"], chunks=len(done["chunks"]))
    return out


def run_ruler(studio: Studio, all_methods: list[Method], examples: list[tuple[int, TaskExample]], max_new_tokens: int,
              on_record: Callable[[dict], None] | None = None, prompt_profile: str = "paper",
              expand_new_tokens: int | None = None) -> list[dict]:
    records = []
    bar = tqdm(total=len(all_methods) * len(examples), desc="ruler", unit="answer")
    for method in all_methods:
        for index, (length, example) in enumerate(examples):
            started = time.perf_counter()
            got = answer(studio, method, example, max_new_tokens, prompt_profile, expand_new_tokens)
            reply = got.pop("reply")
            record = {"method": method.name, "family": method.family, "kind": method.kind, "ratio": method.ratio,
                      "pooling": method.pooling if method.kind in ("lclm", "expand") else None,
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
                result = studio.reconstruct(text, ratio=ratio, pooling=pooling, use_cache=False, max_chunks=1)
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
