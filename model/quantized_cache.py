"""KV-cache quantization as a baseline: the same positions as the full context, fewer bits per
entry. transformers' `QuantizedCache` (KIVI-style: a float residual of the newest entries, the
rest quantized in groups with a scale and zero-point each) with the `optimum-quanto` backend.

Why quanto: a pure-Python wheel (py3-none-any) whose runtime needs are torch, numpy, safetensors,
huggingface_hub (all already here) and ninja (only to build its optional C++/CUDA kernels), so it
installs with `--no-deps` next to a CPU torch; hqq ships as an sdist to build. transformers'
quanto layer offers 2 and 4 bits.

It has the shape of a press (model.presses treats both alike): `with baseline(model):` is a
no-op, `new_cache(config)` is the cache to prefill, compression_ratio is 0 (every position kept),
and `stored_bytes(cache)` counts what the cache holds: packed bits, scales and zero-points, and
the float residual.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

BACKEND = "quanto"
BITS = (2, 4)
RESIDUAL_LENGTH = 64
GROUP_SIZE = 64


def tensor_bytes(tensor) -> int:
    """Bytes a (possibly quanto-packed) tensor stores: the leaves of its flattening."""
    if tensor is None:
        return 0
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def quantized_bytes(numel: int, bits: int, group_size: int, element_size: int) -> int:
    """By hand: numel entries at `bits` each, plus one scale and one zero-point (in the float dtype)
    per group of `group_size` entries."""
    return math.ceil(numel * bits / 8) + 2 * (numel // group_size) * element_size


@dataclass
class QuantizedKV:
    bits: int = 4
    residual_length: int = RESIDUAL_LENGTH  # newest positions kept in float before they are quantized
    group_size: int = GROUP_SIZE  # entries per scale/zero-point (cut to a divisor of head_dim)
    compression_ratio: float = 0.0  # the share of positions removed: none

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"KV-cache quantization takes {' or '.join(map(str, BITS))} bits, got {self.bits}")
        if self.residual_length < 1:
            raise ValueError(f"residual_length must be at least 1, got {self.residual_length}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {self.group_size}")

    def kept_positions(self, length: int) -> int:
        return length

    def group_for(self, config) -> int:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return math.gcd(self.group_size, head_dim)

    def new_cache(self, config):
        from transformers import QuantizedCache

        return QuantizedCache(BACKEND, config, nbits=self.bits, axis_key=0, axis_value=0,
                              q_group_size=self.group_for(config), residual_length=self.residual_length)

    @staticmethod
    def stored_bytes(cache) -> int:
        total = 0
        for layer in cache.layers:
            total += tensor_bytes(getattr(layer, "_quantized_keys", None))
            total += tensor_bytes(getattr(layer, "_quantized_values", None))
            for residual in (layer.keys, layer.values):
                if isinstance(residual, torch.Tensor):
                    total += residual.numel() * residual.element_size()
        return total

    @contextmanager
    def __call__(self, model):
        yield
