"""Analytic prefill cost: FLOPs per token of a decoder-only transformer, linear layers plus
attention, and from them the limit of the LCLM's TTFT gain over full context.

Per token and layer, a prefill over a context of `c` tokens costs
    2 x (linear weights)              q, k, v, o projections and the gated MLP
  + 2 x heads x head_dim x c          QK^T and AV (2 FLOPs each) over c / 2 keys on average (causal)
Full context prefills T tokens at context T. An LCLM runs its encoder over every token in
windows of W (context W) and its decoder over T / N latents (context T / N), so

    gain(T) = dec(T) / (enc(W) + dec(T / N) / N)

which is the "encoder cost per token over decoder cost per token, plus 1/N" of the issue,
with attention growing with the length. The LM head (one position) and the prompt are left out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """The shape of a transformer stack, as far as prefill FLOPs go."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    def __post_init__(self) -> None:
        if min(self.layers, self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate) < 1:
            raise ValueError(f"every size must be positive: {self}")

    @classmethod
    def from_config(cls, config) -> "Shape":
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size,
        )

    @property
    def linear_weights_per_layer(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o and k, v
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        return attention + mlp

    def flops_per_token(self, context: float) -> float:
        """Prefill FLOPs per token when the prefill covers `context` tokens (causal)."""
        per_layer = 2 * self.linear_weights_per_layer + 2 * self.heads * self.head_dim * context
        return self.layers * per_layer

    def kv_bytes_per_token(self, element_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * element_bytes


def ttft_gain_limit(encoder: Shape, decoder: Shape, tokens: int, ratio: int, window: int) -> float:
    """Full-context prefill FLOPs over LCLM (encoder + decoder) prefill FLOPs for `tokens` tokens at 1:ratio."""
    full = decoder.flops_per_token(tokens)
    lclm = encoder.flops_per_token(min(window, tokens)) + decoder.flops_per_token(tokens / ratio) / ratio
    return full / lclm


def encoder_share(encoder: Shape, decoder: Shape, tokens: int, ratio: int, window: int) -> float:
    """The encoder's share of the LCLM's prefill FLOPs."""
    enc = encoder.flops_per_token(min(window, tokens))
    return enc / (enc + decoder.flops_per_token(tokens / ratio) / ratio)


def cached_ttft_gain_limit(decoder: Shape, tokens: int, ratio: int) -> float:
    """The same for cached latents: the LCLM's TTFT is its decoder prefill alone."""
    return decoder.flops_per_token(tokens) / (decoder.flops_per_token(tokens / ratio) / ratio)
