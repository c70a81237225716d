"""The Latent Context Language Model: encoder + pooling + adapter + decoder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from model.adapter import make_adapter
from model.config import LCLMConfig
from model.encoder import LatentEncoder, WindowProgress, count_latents, latent_spans, split_windows
from model.prompts import CHATML_TEMPLATE, MEMORY, MEMORY_END, MEMORY_START


@dataclass
class DocumentTokens:
    """A document tokenized with the encoder's tokenizer."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]  # character span of each token in `text`

    def __len__(self) -> int:
        return len(self.ids)

    def text_of(self, start: int, end: int) -> str:
        """Source text of tokens [start, end)."""
        if start >= end:
            return ""
        return self.text[self.offsets[start][0] : self.offsets[end - 1][1]]


@dataclass
class PreparedPrompt:
    input_ids: torch.Tensor  # [1, P]
    inputs_embeds: torch.Tensor  # [1, P, dec_hidden]

    @property
    def positions(self) -> int:
        return self.input_ids.shape[1]


class LCLM(nn.Module):
    def __init__(
        self,
        config: LCLMConfig,
        encoder_model: nn.Module,
        encoder_tokenizer,
        decoder: nn.Module,
        decoder_tokenizer,
        adapter: nn.Module | None = None,
        checkpoint_id: str = "",
    ):
        super().__init__()
        self.config = config
        pad_id = encoder_tokenizer.pad_token_id
        if pad_id is None:
            pad_id = encoder_tokenizer.eos_token_id if encoder_tokenizer.eos_token_id is not None else 0
        self.encoder = LatentEncoder(encoder_model, config, pad_token_id=pad_id)
        self.decoder = decoder
        self.encoder_tokenizer = encoder_tokenizer
        self.decoder_tokenizer = decoder_tokenizer
        if adapter is None:
            adapter = make_adapter(config.adapter_type, self.encoder.latent_dim, self.decoder_hidden_size)
        self.adapter = adapter
        self.checkpoint_id = checkpoint_id
        vocab = decoder_tokenizer.get_vocab()
        missing = [t for t in (MEMORY_START, MEMORY, MEMORY_END) if t not in vocab]
        if missing:
            raise ValueError(f"decoder tokenizer lacks the memory tokens {missing}")
        self.memory_token_id = vocab[MEMORY]
        self.memory_start_id, self.memory_end_id = vocab[MEMORY_START], vocab[MEMORY_END]

    # ---- shapes and identity -------------------------------------------------
    @property
    def decoder_hidden_size(self) -> int:
        return self.decoder.get_input_embeddings().weight.shape[1]

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.get_input_embeddings().weight.dtype

    @property
    def max_positions(self) -> int | None:
        return getattr(self.decoder.config, "max_position_embeddings", None)

    # ---- encoder side -------------------------------------------------------
    def tokenize_document(self, text: str) -> DocumentTokens:
        enc = self.encoder_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                                     verbose=False)  # read in windows: no warning about the model's length
        return DocumentTokens(text=text, ids=list(enc["input_ids"]), offsets=[tuple(o) for o in enc["offset_mapping"]])

    def latent_spans(self, num_tokens: int) -> list[tuple[int, int]]:
        return latent_spans(num_tokens, self.config.encoder_window_size, self.config.compression_ratio)

    def count_latents(self, num_tokens: int) -> int:
        return count_latents(num_tokens, self.config.encoder_window_size, self.config.compression_ratio)

    def encode(self, token_ids: Sequence[int], progress: WindowProgress | None = None) -> torch.Tensor:
        """Encoder + pooling + adapter, with gradients where enabled: [M, dec_hidden]."""
        pooled = self.encoder(token_ids, progress=progress)  # [M, latent_dim]
        return self.adapter(pooled.to(next(self.adapter.parameters()).dtype)).to(self.dtype)  # [M, dec_hidden]

    def encode_many(self, documents: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """`encode` of several documents with their windows batched together (training):
        one [M_i, dec_hidden] tensor per document, with gradients where enabled."""
        pooled = self.encoder.encode_spans(documents)  # [M_i, latent_dim] each
        adapted = self.adapter(torch.cat(pooled).to(next(self.adapter.parameters()).dtype)).to(self.dtype)
        return list(adapted.split([int(p.shape[0]) for p in pooled]))  # [M_i, dec_hidden] each

    @torch.inference_mode()
    def compress(self, token_ids: Sequence[int], progress: WindowProgress | None = None) -> torch.Tensor:
        """Latents of a whole document: [M, dec_hidden], M = sum over windows of ceil(L/N); group
        by group of windows (`window_groups`), so it equals their `compress_group`s exactly."""
        if len(token_ids) == 0:
            raise ValueError("nothing to compress: the document has no tokens")
        groups = self.window_groups(token_ids)
        parts, done, total = [], 0, sum(len(g) for g in groups)
        for group in groups:
            parts += self.compress_group(group)
            done += len(group)
            if progress is not None:
                progress(done, total)
        return torch.cat(parts, dim=0)

    def window_groups(self, token_ids: Sequence[int]) -> list[Sequence[Sequence[int]]]:
        """The document's encoder windows, in the groups one encoder forward reads (fixed by
        position: a compression resumed from cached windows batches as an uninterrupted one)."""
        return self.encoder.window_groups(split_windows(token_ids, self.config.encoder_window_size))

    @torch.inference_mode()
    def compress_group(self, windows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Latents of one group of windows: encoder, pooling and adapter; [ceil(L_w/N), dec_hidden] each."""
        pooled = self.encoder.encode_group(windows)  # [ceil(L_w/N), latent_dim] each
        adapted = self.adapter(torch.cat(pooled).to(next(self.adapter.parameters()).dtype)).to(self.dtype)
        return list(adapted.split([int(p.shape[0]) for p in pooled]))

    # ---- decoder side -------------------------------------------------------
    def chat(self, user_text: str, assistant_prefix: str = "") -> str:
        """The decoder's chat format around one user turn, ready for the assistant's reply."""
        template = self.decoder_tokenizer.chat_template or CHATML_TEMPLATE
        rendered = self.decoder_tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=True,
        )
        return rendered + assistant_prefix

    def prepare(self, prompt: str, regions: Sequence[torch.Tensor] = ()) -> PreparedPrompt:
        """Tokenize `prompt` and splice each region's latents over its `<|memory|>` placeholders.

        `prompt` holds one `memory_region(len(r))` per region r, in order.
        """
        ids = self.decoder_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return self.prepare_ids(ids, regions)

    def prepare_ids(self, ids: Sequence[int], regions: Sequence[torch.Tensor] = ()) -> PreparedPrompt:
        """Decoder ids [P] with one run of `<|memory|>` placeholders per region, in order, and
        each region's latents spliced over its placeholders."""
        ids = torch.tensor([list(ids)], dtype=torch.long)  # [1, P]
        # Placeholders are found on the host, before the ids move: no device-to-host sync here.
        placeholders = (ids[0] == self.memory_token_id).nonzero().squeeze(-1)  # [sum M_r]
        total = sum(int(r.shape[0]) for r in regions)
        if placeholders.numel() != total:
            raise ValueError(f"prompt has {placeholders.numel()} memory placeholders for {total} latents")
        ids = ids.to(self.device)
        embeds = self.decoder.get_input_embeddings()(ids)  # [1, P, D]
        if total:
            latents = torch.cat([r.to(device=embeds.device, dtype=embeds.dtype) for r in regions], dim=0)
            embeds = embeds.clone()
            embeds[0, placeholders.to(embeds.device)] = latents  # [sum M_r, D] over the placeholders, in order
        return PreparedPrompt(input_ids=ids, inputs_embeds=embeds)
