"""Reconstruction and how faithfully it reproduces its source, in tokens: the one path shared by
the studio's Reconstruction tab, the quality benchmark and training's validation."""

from __future__ import annotations

import difflib

import torch

from model.generation import decode, prefill, stop_token_ids
from model.prompts import memory_region, reconstruction_prompt


def reconstruction_embeds(lclm, latents: torch.Tensor) -> torch.Tensor:
    """The reconstruction prompt's embeddings [1, P, D] with `latents` ([M, dec_hidden]) in its
    one memory region."""
    prompt = lclm.chat(reconstruction_prompt(memory_region(int(latents.shape[0]))))
    return lclm.prepare(prompt, [latents]).inputs_embeds


def reconstruct(lclm, latents: torch.Tensor, max_new_tokens: int) -> list[int]:
    """The decoder's greedy reproduction of the text behind `latents` ([M, dec_hidden], one
    memory region in the reconstruction prompt), up to `max_new_tokens` or its end of turn."""
    state = prefill(lclm.decoder, reconstruction_embeds(lclm, latents))
    return list(decode(lclm.decoder, state, max_new_tokens, stop_token_ids(lclm.decoder_tokenizer, lclm.decoder)))


def token_accuracy(reference: list[int], generated: list[int]) -> float:
    """Share of reference tokens reproduced, in order: matched tokens of the longest
    alignment (difflib, no junk heuristics) over the reference length."""
    if not reference:
        return 1.0 if not generated else 0.0
    matcher = difflib.SequenceMatcher(a=reference, b=generated, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()) / len(reference)
