"""The LCLM encoder: windows of W tokens -> HF base model -> pooling per group of N."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from model.config import LCLMConfig
from model.pooling import latents_per_window, make_pooling

WindowProgress = Callable[[int, int], None]  # (windows done, windows total)

# Encoder tokens per forward batch when none is set, by device type. A GPU needs large batches
# to be busy; on a CPU one 1024-token window at a time is as fast as batches of 16 and holds a
# fraction of the activations (7,680 tokens of the embedded model: about 2.0 s and 90 MiB above
# the weights, against 2.7 s and 390 MiB for batches of 16,384 tokens).
DEFAULT_BATCH_TOKENS = {"cpu": 1024}
DEFAULT_BATCH_TOKENS_ELSEWHERE = 16384


def set_mask_type(model: nn.Module, mask_type: str) -> None:
    """Make the encoder's attention causal or bidirectional, on its config and attention modules."""
    causal = mask_type == "causal"
    model.config.is_causal = causal
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = causal


def window_lengths(num_tokens: int, window: int) -> list[int]:
    """Token counts of the encoder windows that cover `num_tokens` tokens."""
    return [min(window, num_tokens - start) for start in range(0, num_tokens, window)]


def split_windows(token_ids: Sequence[int], window: int) -> list[Sequence[int]]:
    """The encoder windows of a token sequence: consecutive slices of at most `window` tokens."""
    return [token_ids[start : start + window] for start in range(0, len(token_ids), window)]


def latent_spans(num_tokens: int, window: int, ratio: int) -> list[tuple[int, int]]:
    """[start, end) token range behind each latent, in document order."""
    spans = []
    for window_start in range(0, num_tokens, window):
        window_end = min(window_start + window, num_tokens)
        for start in range(window_start, window_end, ratio):
            spans.append((start, min(start + ratio, window_end)))
    return spans


def count_latents(num_tokens: int, window: int, ratio: int) -> int:
    return sum(latents_per_window(length, ratio) for length in window_lengths(num_tokens, window))


class LatentEncoder(nn.Module):
    """Encodes token ids window by window and pools each window's hidden states into latents."""

    def __init__(self, model: nn.Module, config: LCLMConfig, pad_token_id: int, max_batch_tokens: int | None = None):
        super().__init__()
        self.model = model
        self.config = config
        self.pooling = make_pooling(config.pooling, config.compression_ratio)
        self.pad_token_id = pad_token_id
        self.max_batch_tokens = max_batch_tokens  # None: DEFAULT_BATCH_TOKENS for the device
        set_mask_type(model, config.encoder_mask_type)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def latent_dim(self) -> int:
        return self.pooling.latent_dim(self.hidden_size)

    def batch_tokens(self) -> int:
        """Encoder tokens per forward batch (the bound on the encoder's activation memory)."""
        if self.max_batch_tokens is not None:
            return self.max_batch_tokens
        device = next(self.model.parameters()).device
        return DEFAULT_BATCH_TOKENS.get(device.type, DEFAULT_BATCH_TOKENS_ELSEWHERE)

    def _encode_batch(self, windows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Forward of several windows (left-padded where their lengths differ); each window's latents [n_i, D]."""
        device = next(self.model.parameters()).device
        rows = [list(w) + [self.pad_token_id] * self.pooling.extra_tokens(len(w)) for w in windows]
        width = max(len(r) for r in rows)
        if all(len(r) == width for r in rows):
            # No padding: no mask, so attention takes SDPA's fused causal (or full) path, and
            # positions default to 0..width-1 in every window. No KV cache: nothing reads it.
            input_ids = torch.tensor(rows, dtype=torch.long)  # [B, width]
            hidden = self.model(input_ids=input_ids.to(device), use_cache=False).last_hidden_state  # [B, width, H]
        else:
            hidden = self._padded_forward(rows, width, device)  # [B, width, H]
        return [
            self.pooling.pool(hidden[i, width - len(row) :], len(window))  # [ceil(L/N), D]
            for i, (row, window) in enumerate(zip(rows, windows))
        ]

    def _padded_forward(self, rows: list[list[int]], width: int, device: torch.device) -> torch.Tensor:
        """Forward of rows of different lengths, left-padded to `width`: [B, width, H]."""
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # restart at 0 in each window
        return self.model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=False,
        ).last_hidden_state  # [B, width, H]

    def window_groups(self, windows: Sequence[Sequence[int]]) -> list[Sequence[Sequence[int]]]:
        """The windows in the groups one forward encodes: batch_tokens() // W (at least one) each,
        fixed by position, so that encoding any group alone gives what the whole document gives."""
        per_batch = max(1, self.batch_tokens() // self.config.encoder_window_size)
        return [windows[first : first + per_batch] for first in range(0, len(windows), per_batch)]

    def encode_group(self, windows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """One forward over a group of windows: each window's latents [ceil(L_w/N), D]."""
        return self._encode_batch(windows)

    def _encode_windows(self, windows: Sequence[Sequence[int]],
                        progress: WindowProgress | None = None) -> list[torch.Tensor]:
        """Latents of each window, group by group (window_groups); `progress` after each forward.
        One [ceil(L_w/N), D] tensor per window."""
        pooled: list[torch.Tensor] = []
        for group in self.window_groups(windows):
            pooled.extend(self._encode_batch(group))
            if progress is not None:
                progress(len(pooled), len(windows))
        return pooled

    def encode_spans(self, spans: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Latents of several token spans, each windowed on its own and all windows batched
        together (training): one [sum over its windows of ceil(L/N), D] tensor per span."""
        window = self.config.encoder_window_size
        windows, owners = [], []
        for owner, ids in enumerate(spans):
            span_windows = split_windows(ids, window)
            windows += span_windows
            owners += [owner] * len(span_windows)
        parts: list[list[torch.Tensor]] = [[] for _ in spans]
        for owner, latents in zip(owners, self._encode_windows(windows)):
            parts[owner].append(latents)  # [ceil(L_w/N), D]
        return [torch.cat(p, dim=0) for p in parts]

    def forward(self, token_ids: Sequence[int], progress: WindowProgress | None = None) -> torch.Tensor:
        """token_ids: the document's T encoder tokens -> pooled latents [sum ceil(L_w/N), D]."""
        windows = split_windows(token_ids, self.config.encoder_window_size)
        return torch.cat(self._encode_windows(windows, progress), dim=0)
