"""Adapters: map pooled encoder latents into the decoder's embedding space."""

from __future__ import annotations

import torch
from torch import nn


class MLPAdapter(nn.Module):
    """`RMSNorm(enc) -> Linear(enc, dec) -> GELU -> Linear(dec, dec)`.

    Parameter names match the published `adapter.safetensors`:
    norm.weight, fc1.weight, fc1.bias, fc2.weight, fc2.bias.
    """

    name = "mlp"

    def __init__(self, enc_dim: int, dec_dim: int):
        super().__init__()
        self.norm = nn.RMSNorm(enc_dim, eps=1e-6)
        self.fc1 = nn.Linear(enc_dim, dec_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dec_dim, dec_dim)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        # latents: [..., enc_dim] -> [..., dec_dim]
        return self.fc2(self.act(self.fc1(self.norm(latents))))


ADAPTERS: dict[str, type[nn.Module]] = {MLPAdapter.name: MLPAdapter}


def make_adapter(adapter_type: str, enc_dim: int, dec_dim: int) -> nn.Module:
    return ADAPTERS[adapter_type](enc_dim, dec_dim)
