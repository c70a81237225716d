"""What an answer method returns (app/engine/methods.py): one `Answer`, read by attribute by the CLI,
the studio, the history and the benchmarks, and written as JSON by `to_json()` with the keys the
CLI and the studio's API have always given (tests/golden/cli_json_keys.json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from app.engine.measure import Measurement

UNTRAINED_NOTE = "untrained: this LCLM's adapter is freshly initialised, so its latents carry no learned meaning"


@dataclass
class ExpandTrace:
    """What the EXPAND agent did: its chunks, its rounds and the chunks it read as text."""

    answer_ttft_ms: float  # the meter's clock at the first token of the round that answered
    chunk_tokens: int
    chunks: list[dict]  # Chunk.to_dict() of each chunk, numbered from 1
    rounds: list[dict]  # Round.to_dict() of each round
    expanded: list[int] = field(default_factory=list)  # chunk numbers read as text, sorted


@dataclass
class PressTrace:
    """What a KV-cache press kept."""

    prefilled_positions: int  # context + question, as read before the press
    press_ratio: float  # the fraction of the context's KV pairs the press removes
    kv_positions_held: int  # entries the cache holds (kvzip masks evicted keys and keeps them)


@dataclass
class Answer:
    text: str
    method: str  # its name in app.engine.methods.METHODS ("lclm", "full", "snapkv", ...)
    label: str  # how the page names it ("LCLM", "full context", ...)
    question: str
    ratio: int | None  # the LCLM's 1:N or a press's matched N; None where no ratio applies
    pooling: str | None  # the LCLM's pooling; None for methods that read text
    checkpoint: str
    prompt_profile: str
    tokens: int  # the document's encoder tokens
    measurement: Measurement
    precision: dict  # DtypeChoice.to_dict()
    stopped: str = "end"  # how the reply ended: end, limit or repeat (app.engine.methods.STOPS)
    warnings: list[str] = field(default_factory=list)  # what a reader must be told about it
    latents: int = 0
    cached: bool = False  # every latent from the latent cache
    trained: bool = True  # False: an untrained LCLM (its latents mean nothing yet)
    base_decoder: bool | None = None  # text-reading methods: read by the decoder LoRA's base model
    expand: ExpandTrace | None = None
    press: PressTrace | None = None

    @property
    def note(self) -> str | None:
        return None if self.trained else UNTRAINED_NOTE

    @property
    def empty(self) -> bool:
        return not self.text.strip()

    def to_json(self) -> dict:
        """The answer as the CLI prints it and the API returns it."""
        m = self.measurement.to_dict()
        out = {"answer": self.text, "mode": self.method, "method": self.label, "question": self.question,
               "ratio": self.ratio, "pooling": self.pooling, "checkpoint": self.checkpoint,
               "prompt_profile": self.prompt_profile, "tokens": self.tokens, "latents": self.latents,
               "compress_ms": m["compress_ms"], "cached": self.cached, "trained": self.trained,
               "stopped": self.stopped, "warnings": list(self.warnings)}
        if self.expand is not None:
            out.update(asdict(self.expand))
        if self.press is not None:
            out.update(asdict(self.press))
        if self.base_decoder is not None:
            out["base_decoder"] = self.base_decoder
        out.update(m)
        out.update(self.precision)
        if self.note:
            out["note"] = self.note
        return out
