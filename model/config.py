"""Shape settings of an LCLM, as stored in a checkpoint's `model_config.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

MASK_TYPES = ("causal", "bidirectional")
# The compression ratios (encoder tokens per latent) the paper trains and this project offers,
# and the variant a checkpoint without its own says is: the one list every CLI, tab, benchmark
# and training campaign reads.
RATIOS = (4, 8, 16)
DEFAULT_RATIO = 16
DEFAULT_POOLING = "mean"


@dataclass
class LCLMConfig:
    """The keys of `model_config.json` (see the published checkpoint format).

    `trained` is this project's own key: False marks a checkpoint whose adapter
    (and so its latents) comes from random initialisation.
    """

    compression_ratio: int = DEFAULT_RATIO
    encoder_window_size: int = 1024
    pooling: str = DEFAULT_POOLING
    encoder_mask_type: str = "causal"
    boundary_overlap: int = 0
    adapter_type: str = "mlp"
    num_adapter_layers: int | None = None
    trained: bool = True

    def __post_init__(self) -> None:
        from model.adapter import ADAPTERS
        from model.pooling import POOLINGS

        if not isinstance(self.compression_ratio, int) or self.compression_ratio < 1:
            raise ValueError(f"compression_ratio must be an integer >= 1, got {self.compression_ratio!r}")
        if self.encoder_window_size < self.compression_ratio or self.encoder_window_size % self.compression_ratio:
            raise ValueError(
                f"encoder_window_size ({self.encoder_window_size}) must be a positive multiple "
                f"of compression_ratio ({self.compression_ratio})"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {sorted(POOLINGS)}, got {self.pooling!r}")
        if self.encoder_mask_type not in MASK_TYPES:
            raise ValueError(f"encoder_mask_type must be one of {MASK_TYPES}, got {self.encoder_mask_type!r}")
        if self.boundary_overlap != 0:
            raise ValueError("boundary_overlap other than 0 is not supported (the released models use 0)")
        if self.adapter_type not in ADAPTERS:
            raise ValueError(f"adapter_type {self.adapter_type!r} is not supported; supported: {sorted(ADAPTERS)}")

    @classmethod
    def from_dict(cls, data: dict) -> "LCLMConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> "LCLMConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["num_adapter_layers"] is None:
            del data["num_adapter_layers"]
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def name(self) -> str:
        """Short variant name in the authors' style, e.g. `cs16-mean-w1024-causal-mlp`."""
        return (
            f"cs{self.compression_ratio}-{self.pooling}-w{self.encoder_window_size}"
            f"-{self.encoder_mask_type}-{self.adapter_type}"
        )
