"""Attention Matching KV compaction ("Fast KV Compaction via Attention Matching", Zweiger, Fu,
Guo, Kim, arXiv 2602.16284), as a press in kvpress's plug-in shape.

Per layer and KV head, the context's T cached keys/values are replaced by t = ceil(T / N)
compact entries (C_k, C_v) with one attention-mass weight w_j >= 0 each, chosen so that for the
reference queries q the compact block reproduces the full block's

- attention mass   Z(q) = sum_i exp(q.k_i s)       ~ sum_j w_j exp(q.C_k[j] s)
- attention output o(q) = sum_i a_i(q) v_i          ~ sum_j p_j(q) C_v[j]
  with p_j(q) = w_j exp(q.C_k[j] s) / sum_l w_l exp(q.C_k[l] s), s = 1 / sqrt(head_dim).

Matching the mass as well as the output is what lets later tokens (the question, the answer)
split their attention between the compacted context and themselves as they would have over the
full context. Three closed-form steps, per (batch, KV head):

1. compact keys: the t cached keys with the highest mean attention weight under the reference
   queries (kept in their original order, still rotated at their original positions);
2. mass weights: non-negative least squares, min_w || (E_c w) / Z - 1 ||^2 s.t. w >= 0, where
   E_c[q, j] = exp(q.C_k[j] s) (each query's relative mass error counts equally); solved by
   accelerated projected gradient on the normal equations, started from the clamped ridge
   least-squares solution (exact, w = 1, when nothing is removed);
3. compact values: least squares, min_Cv || P C_v - O ||^2 + lambda || C_v - V[kept] ||^2, with P the
   compact attention weights above and O the full block's outputs (the small ridge pulls
   directions the queries do not constrain back to the kept values).

Reference queries: the context's own query vectors at the same layer, every query head of the KV
group (GQA), after RoPE at their own positions, at up to `reference_queries` positions spread
evenly over the context (always including the last). They attend to the whole block without a
causal mask, standing in for the later queries that see all of it.

The weights act in attention exactly: log w_j is added to the logit of compact entry j, since
softmax(x + log w) = w exp(x) / sum(w exp(x)). The press stores the log weights on the cache
(`cache.attention_biases[layer] = [B, kv_heads, t]`); a forward pre-hook on each attention
module passes its layer's biases to the attention function `attention_matching`, registered
with transformers' AttentionInterface (masks as sdpa's), which adds them to the first t key
positions of that layer's logits (per KV head, repeated over its query heads) and runs sdpa with
the resulting float mask. A cache without biases, or a layer without them, takes the plain sdpa
path, so the decoder keeps `attention_matching` as its implementation once a press has run.

Imports kvpress (and so datasets and pandas): import this module lazily, as model.presses does.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from kvpress.presses.base_press import BasePress
from kvpress.utils import get_prerope_query_states
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

ATTENTION = "attention_matching"
NNLS_STEPS = 200
RIDGE = 1e-9  # relative to the mean diagonal of the normal matrix


@dataclass
class Compacted:
    keys: torch.Tensor  # [B, H, t, d] the kept (rotated) keys
    values: torch.Tensor  # [B, H, t, d] refitted values
    weights: torch.Tensor  # [B, H, t] attention-mass weights, >= 0
    indices: torch.Tensor  # [B, H, t] positions of the kept keys in the block

    @property
    def log_bias(self) -> torch.Tensor:
        """[B, H, t] the logit bias log w (a weight of 0 becomes a bias that removes the entry)."""
        return self.weights.clamp_min(1e-30).log()


def compact_size(length: int, compression_ratio: float) -> int:
    """t = ceil(T (1 - ratio)), at least 1: entries kept of a block of T."""
    return max(1, math.ceil(round(length * (1.0 - compression_ratio), 6)))


def check_ratio(compression_ratio: float) -> None:
    if not 0.0 <= compression_ratio < 1.0:
        raise ValueError(f"compression_ratio is the share of KV pairs removed and must be in [0, 1), "
                         f"got {compression_ratio}")


def nnls(gram: torch.Tensor, rhs: torch.Tensor, steps: int = NNLS_STEPS) -> torch.Tensor:
    """min_w 1/2 w^T G w - b^T w subject to w >= 0, batched: G [..., t, t] (positive semi-definite),
    b [..., t] -> w [..., t]. Accelerated projected gradient (FISTA), step 1 / largest eigenvalue,
    from the clamped solution of the ridge-regularized system."""
    t = gram.shape[-1]
    eye = torch.eye(t, dtype=gram.dtype, device=gram.device)
    ridge = RIDGE * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None]  # [..., 1, 1]
    w = torch.linalg.solve(gram + ridge * eye, rhs[..., None])[..., 0].clamp_min(0)  # [..., t]
    step = 1.0 / torch.linalg.eigvalsh(gram)[..., -1:].clamp_min(1e-30)  # [..., 1]
    y, previous, momentum = w, w, 1.0
    for _ in range(steps):
        grad = (gram @ y[..., None])[..., 0] - rhs  # [..., t]
        w = (y - step * grad).clamp_min(0)
        next_momentum = (1 + math.sqrt(1 + 4 * momentum**2)) / 2
        y = w + (momentum - 1) / next_momentum * (w - previous)
        previous, momentum = w, next_momentum
    return w


@torch.no_grad()
def compact_block(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, size: int,
                  scaling: float, refit: bool = True) -> Compacted:
    """Compact T entries to `size` per (batch, KV head). keys, values: [B, H, T, d]; queries: [B, H, n, d]
    (the reference queries of each KV head, its query heads stacked). With refit False: the same
    top-attention keys with their own values and weight 1 (the ablation without the fits)."""
    B, H, T, d = keys.shape
    if not 1 <= size <= T:
        raise ValueError(f"a block of {T} entries cannot be compacted to {size}")
    work = torch.float64
    k, v, q = keys.to(work), values.to(work), queries.to(work)
    logits = q @ k.transpose(-1, -2) * scaling  # [B, H, n, T]
    shift = logits.amax(-1, keepdim=True)  # [B, H, n, 1] per-query stabilizer, shared by both sides
    mass = (logits - shift).exp()  # [B, H, n, T]
    total = mass.sum(-1, keepdim=True)  # [B, H, n, 1]
    attention = mass / total  # [B, H, n, T]
    indices = attention.mean(-2).topk(size, dim=-1).indices.sort(-1).values  # [B, H, t]
    gather = indices[..., None].expand(B, H, size, d)  # [B, H, t, d]
    kept_values = v.gather(2, gather)  # [B, H, t, d]
    if not refit:
        return Compacted(keys.gather(2, gather), values.gather(2, gather),
                         torch.ones(B, H, size, dtype=keys.dtype, device=keys.device), indices)
    kept_mass = mass.gather(-1, indices[..., None, :].expand(B, H, q.shape[2], size)) / total  # [B, H, n, t]
    n = q.shape[2]
    gram = kept_mass.transpose(-1, -2) @ kept_mass / n  # [B, H, t, t]
    rhs = kept_mass.sum(-2) / n  # [B, H, t]: target relative mass 1 for every query
    weights = nnls(gram, rhs)  # [B, H, t]
    weighted = kept_mass * weights[..., None, :]  # [B, H, n, t]
    compact_attention = weighted / weighted.sum(-1, keepdim=True).clamp_min(1e-300)  # [B, H, n, t]
    outputs = attention @ v  # [B, H, n, d]
    normal = compact_attention.transpose(-1, -2) @ compact_attention  # [B, H, t, t]
    ridge = RIDGE * normal.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None]  # [B, H, 1, 1]
    eye = torch.eye(size, dtype=work, device=keys.device)
    rhs_values = compact_attention.transpose(-1, -2) @ outputs + ridge * kept_values  # [B, H, t, d]
    new_values = torch.linalg.solve(normal + ridge * eye, rhs_values)  # [B, H, t, d]
    return Compacted(keys.gather(2, gather), new_values.to(values.dtype), weights.to(keys.dtype), indices)


def block_output(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, scaling: float,
                 log_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of queries [B, H, n, d] over one block keys/values [B, H, T, d] (+ log_bias [B, H, T]):
    [B, H, n, d]."""
    logits = queries @ keys.transpose(-1, -2) * scaling  # [B, H, n, T]
    if log_bias is not None:
        logits = logits + log_bias[..., None, :]
    return logits.softmax(-1) @ values


def reference_positions(length: int, count: int, device) -> torch.Tensor:
    """[min(length, count)] positions spread evenly over the context, the last one included."""
    if length <= count:
        return torch.arange(length, device=device)
    return torch.linspace(0, length - 1, count, device=device).round().long().unique()


def context_queries(module: nn.Module, hidden_states: torch.Tensor, position_embeddings, positions: torch.Tensor,
                    kv_heads: int) -> torch.Tensor:
    """The layer's own queries at `positions`, rotated: [B, kv_heads, groups * P, d]."""
    states = hidden_states[:, positions]  # [B, P, hidden]
    q = get_prerope_query_states(module, states)  # [B, heads, P, d]
    cos, sin = position_embeddings  # [B, T, d] each
    cos, sin = cos[:, positions].unsqueeze(1), sin[:, positions].unsqueeze(1)  # [B, 1, P, d]
    q = q * cos + rotate_half(q) * sin
    B, heads, P, d = q.shape
    return q.reshape(B, kv_heads, (heads // kv_heads) * P, d)  # query head h belongs to KV head h // groups


# ---- the bias in attention --------------------------------------------------------------------
def attention_matching_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, attention_bias: torch.Tensor | None = None,
                               **kwargs):
    """sdpa, plus `attention_bias` [B, kv_heads, t] added to the logits of key positions [0, t)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_bias is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    B, heads, q_len, _ = query.shape
    k_len, t = key.shape[2], attention_bias.shape[-1]
    if attention_mask is None:  # sdpa skipped it: causal, the queries being the last q_len keys
        rows = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]  # [q, 1]
        allowed = torch.arange(k_len, device=query.device)[None, :] <= rows  # [q, k]
        attention_mask = allowed[None, None]
    if attention_mask.dtype == torch.bool:
        mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(~attention_mask, torch.finfo(query.dtype).min)
    else:
        mask = attention_mask.to(query.dtype)
    mask = mask[..., -k_len:].expand(B, heads, q_len, k_len).clone()  # [B, heads, q, k]
    bias = attention_bias.to(query.dtype).repeat_interleave(heads // attention_bias.shape[1], dim=1)  # [B, heads, t]
    mask[..., :t] += bias[:, :, None, :]
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kwargs)


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, attention_matching_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def pass_biases(module: nn.Module, args, kwargs):
    """Forward pre-hook: hand this layer's biases, if its cache holds some, to the attention function."""
    biases = getattr(kwargs.get("past_key_values"), "attention_biases", None)
    if biases and module.layer_idx in biases:
        kwargs["attention_bias"] = biases[module.layer_idx]
    return args, kwargs


def install(model) -> None:
    """Make `model` apply the biases a compacted cache carries (idempotent)."""
    register_attention()
    language_model = model.model.language_model if hasattr(model.model, "language_model") else model.model
    model.config._attn_implementation = ATTENTION
    language_model.config._attn_implementation = ATTENTION
    for layer in language_model.layers:
        attention = layer.self_attn
        if not getattr(attention, "_passes_attention_biases", False):
            attention.register_forward_pre_hook(pass_biases, with_kwargs=True)
            attention._passes_attention_biases = True


@dataclass
class AttentionMatchingPress(BasePress):
    """kvpress-shaped press: `with press(model): model.model(context, past_key_values=cache)`
    leaves t = ceil(T (1 - compression_ratio)) compacted entries per layer and KV head in the
    cache, with their log-mass biases in `cache.attention_biases`."""

    compression_ratio: float = 0.0
    reference_queries: int = 256  # context positions whose queries are matched (per query head)
    refit: bool = True  # False: top-attention keys only (no bias, no value fit), for comparison

    def __post_init__(self):
        check_ratio(self.compression_ratio)
        if self.reference_queries < 1:
            raise ValueError(f"reference_queries must be at least 1, got {self.reference_queries}")

    def kept_positions(self, length: int) -> int:
        return length if self.compression_ratio == 0 else compact_size(length, self.compression_ratio)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if self.compression_ratio == 0:
            return keys, values
        B, kv_heads, T, d = keys.shape  # keys, values: [B, kv_heads, T, d]
        positions = reference_positions(T, self.reference_queries, keys.device)  # [P]
        queries = context_queries(module, hidden_states, kwargs["position_embeddings"], positions, kv_heads)
        compacted = compact_block(keys, values, queries, compact_size(T, self.compression_ratio), module.scaling,
                                  refit=self.refit)
        cache = kwargs["past_key_values"]
        if self.refit:
            if getattr(cache, "attention_biases", None) is None:
                cache.attention_biases = {}
            cache.attention_biases[module.layer_idx] = compacted.log_bias  # [B, kv_heads, t]
        return compacted.keys.contiguous(), compacted.values.contiguous()

    @contextmanager
    def __call__(self, model):
        install(model)
        with super().__call__(model):
            yield
