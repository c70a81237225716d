"""Pooling operators: how a group of N encoder hidden states becomes one latent.

Each operator is a small class registered in POOLINGS. An operator may add marker
tokens to a window before encoding (`extra_tokens`) and turns the encoder's hidden
states of one window into that window's latents (`pool`).
"""

from __future__ import annotations

import math

import torch


def latents_per_window(length: int, ratio: int) -> int:
    """A window of `length` tokens yields ceil(length / ratio) latents."""
    return math.ceil(length / ratio)


class Pooling:
    name: str = ""

    def __init__(self, ratio: int):
        self.ratio = ratio

    def latent_dim(self, hidden_size: int) -> int:
        return hidden_size

    def extra_tokens(self, length: int) -> int:
        """Marker tokens appended after a window of `length` tokens."""
        return 0

    def pool(self, hidden: torch.Tensor, length: int) -> torch.Tensor:
        """hidden: [length + extra_tokens(length), H] of one window -> [ceil(length/N), D]."""
        raise NotImplementedError


class MeanPooling(Pooling):
    name = "mean"

    def pool(self, hidden: torch.Tensor, length: int) -> torch.Tensor:
        n = self.ratio
        full = length // n
        parts = []
        if full:
            parts.append(hidden[: full * n].view(full, n, -1).mean(dim=1))  # [full, H]
        if length % n:
            parts.append(hidden[full * n : length].mean(dim=0, keepdim=True))  # [1, H], shorter last group
        return torch.cat(parts, dim=0)


class ConcatPooling(Pooling):
    name = "concat"

    def latent_dim(self, hidden_size: int) -> int:
        return self.ratio * hidden_size

    def pool(self, hidden: torch.Tensor, length: int) -> torch.Tensor:
        n = self.ratio
        groups = latents_per_window(length, n)
        padded = hidden.new_zeros(groups * n, hidden.shape[-1])  # [groups*N, H], zero-padded tail
        padded[:length] = hidden[:length]
        return padded.view(groups, n * hidden.shape[-1])  # [groups, N*H]


class EosPooling(Pooling):
    name = "eos"

    def extra_tokens(self, length: int) -> int:
        return latents_per_window(length, self.ratio)

    def pool(self, hidden: torch.Tensor, length: int) -> torch.Tensor:
        return hidden[length : length + self.extra_tokens(length)]  # [groups, H], the markers' states


POOLINGS: dict[str, type[Pooling]] = {cls.name: cls for cls in (MeanPooling, ConcatPooling, EosPooling)}


def make_pooling(name: str, ratio: int) -> Pooling:
    return POOLINGS[name](ratio)
