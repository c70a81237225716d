"""The base decoder as a teacher: its greedy reply to a text-only prompt and its next-token
distribution at every reply position, generated once and cached on disk.

The teacher is the LCLM's own decoder with its LoRA switched off (the memory-token rows it also
holds never occur in a text-only prompt), so it needs no second copy of the weights. A reply is
kept as its token ids and, per position, the TOP_K most likely next tokens with their
log-probabilities; distillation (`soft_loss`) renormalises over those. The cache is a JSON-lines
file keyed by a hash of the prompt ids: a resumed campaign reads it back instead of generating
again.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

TOP_K = 16  # next-token candidates kept per reply position


@dataclass
class TeacherReply:
    ids: list[int]  # the greedy reply, stop token excluded
    top_ids: list[list[int]]  # [T][TOP_K] per position: T = len(ids) + 1 when it stopped, else len(ids)
    top_logprobs: list[list[float]]
    stopped: bool  # ended with a stop token within the limit (its distribution is the last row)


@contextmanager
def base_decoder(decoder):
    """The decoder with every PEFT adapter off (its LoRA matrices, and the memory-token rows, which
    no text-only prompt reads: the plain embedding is used without merging them in at every
    step), in eval mode; adapters, which parameters train, and the mode are restored on exit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in decoder.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    trains = {p: p.requires_grad for p in decoder.parameters()}  # enable_adapters changes requires_grad
    was_training = decoder.training
    for layer in layers:
        layer.enable_adapters(False)
    decoder.eval()
    try:
        yield decoder
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in trains.items():
            p.requires_grad_(flag)
        decoder.train(was_training)


@torch.no_grad()
def greedy_reply(decoder, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int], top_k: int = TOP_K,
                 autocast: bool = False) -> TeacherReply:
    """Greedy decoding of `decoder` after `prompt_ids`, with the top-k distribution at each step."""
    device = next(decoder.parameters()).device
    ids, top_ids, top_logprobs, stopped = [], [], [], False
    tokens = torch.tensor([prompt_ids], device=device)  # [1, P]
    cache = None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for _ in range(max_new_tokens + 1):
            out = decoder(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            logprobs = F.log_softmax(out.logits[0, -1].float(), -1)  # [vocab]
            best = logprobs.topk(top_k)
            top_ids.append(best.indices.tolist())
            top_logprobs.append([round(v, 4) for v in best.values.tolist()])
            token = int(best.indices[0])
            if token in stop_ids:
                stopped = True
                break
            if len(ids) == max_new_tokens:
                top_ids.pop()
                top_logprobs.pop()
                break
            ids.append(token)
            tokens = torch.tensor([[token]], device=device)  # [1, 1]
    return TeacherReply(ids, top_ids, top_logprobs, stopped)


class TeacherCache:
    """Teacher replies by prompt, in memory and appended to `path` (JSON lines) when given."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.replies: dict[str, TeacherReply] = {}
        self.generated = 0
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by an interrupted write
                    continue
                key = record.pop("key")
                self.replies[key] = TeacherReply(**record)

    @staticmethod
    def key(prompt_ids: list[int], max_new_tokens: int) -> str:
        return hashlib.sha256(json.dumps([max_new_tokens, prompt_ids]).encode()).hexdigest()[:32]

    def reply(self, decoder, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int],
              autocast: bool = False) -> TeacherReply:
        key = self.key(prompt_ids, max_new_tokens)
        if key not in self.replies:
            with base_decoder(decoder):
                self.replies[key] = greedy_reply(decoder, prompt_ids, max_new_tokens, stop_ids, autocast=autocast)
            self.generated += 1
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as f:
                    f.write(json.dumps({"key": key, **asdict(self.replies[key])}) + "\n")
        return self.replies[key]


def soft_loss(logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student's distribution against the teacher's, renormalised over the
    teacher's top-k (KL up to the teacher's entropy), per position.
    logits: [n, vocab]; top_ids, top_logprobs: [n, k] -> [n]."""
    target = top_logprobs.softmax(-1)  # [n, k]
    student = F.log_softmax(logits.float(), -1).gather(-1, top_ids)  # [n, k]
    return -(target * student).sum(-1)
