"""The models the studio offers: families of LCLM variants (compression ratio x pooling).

A family is what the user picks as "model": the embedded SmolLM2 default (every ratio and
pooling, trained where weights are shipped) or the checkpoints named with `--checkpoint`
(each one fixed to its own ratio and pooling, read from its model_config.json).
A `Variant` says which spec, ratio and pooling to hand to `Studio.model`. The studio opens on
the best trained variant (by the free-running reconstruction its model card reports), and every
"other ratio" control picks that ratio's best trained variant, so comparisons are like for like.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model.embedded import variant_rank
from model.errors import UserError

EMBEDDED_FAMILY = "embedded SmolLM2-135M"
CHECKPOINT_FAMILY = "--checkpoint"


@dataclass(frozen=True)
class Variant:
    family: str
    spec: str  # "embedded", a checkpoint directory or a hub id
    ratio: int
    pooling: str
    trained: bool
    quality: float | None = None  # free-running reconstruction reported by its model card (None: not known)

    @property
    def pooling_label(self) -> str:
        return self.pooling if self.trained else f"{self.pooling} (untrained)"

    @property
    def label(self) -> str:
        return f"1:{self.ratio} {self.pooling_label}"


class Catalog:
    """Every variant on offer, in display order. The default is the first given checkpoint, else
    the embedded family's best trained variant."""

    def __init__(self, variants: Sequence[Variant]):
        if not variants:
            raise ValueError("a catalog needs at least one variant")
        self.variants = list(variants)

    @property
    def default(self) -> Variant:
        first = self.variants[0]
        return first if first.family == CHECKPOINT_FAMILY else self.best(first.family)

    def best(self, family: str, ratio: int | None = None, like: Variant | None = None) -> Variant | None:
        """The family's best variant (at `ratio`): trained before untrained, then by the quality its
        card reports, then `like`'s pooling, then display order (None: the family has no such ratio)."""
        offered = [v for v in self.variants if v.family == family and ratio in (None, v.ratio)]
        if not offered:
            return None

        def rank(v: Variant) -> tuple:
            return *variant_rank(v.trained, v.quality), like is not None and v.pooling == like.pooling
        return max(offered, key=rank)  # max keeps the first of equals: display order

    def families(self) -> list[str]:
        return list(dict.fromkeys(v.family for v in self.variants))

    def ratios(self, family: str) -> list[int]:
        return sorted({v.ratio for v in self.variants if v.family == family})

    def poolings(self, family: str, ratio: int) -> list[tuple[str, str]]:
        """(label, value) pairs for a pooling selector; untrained variants say so."""
        return [(v.pooling_label, v.pooling) for v in self.variants if v.family == family and v.ratio == ratio]

    def find(self, family: str, ratio: int | str, pooling: str) -> Variant:
        ratio = int(ratio)
        for v in self.variants:
            if v.family == family and v.ratio == ratio and v.pooling == pooling:
                return v
        offered = ", ".join(v.label for v in self.variants if v.family == family) or "none"
        raise UserError(f"{family} has no 1:{ratio} {pooling} variant; it offers: {offered}")

    def sibling(self, variant: Variant, ratio: int) -> Variant | None:
        """The same family at another ratio, for comparisons: its best trained variant there (the
        same pooling among equals)."""
        return self.best(variant.family, ratio, like=variant)


def embedded_variants() -> list[Variant]:
    """The embedded family: every ratio and pooling; trained where weights are shipped."""
    from model.checkpoint import has_layout
    from model.embedded import embedded_config, shipped_quality, trained_dir, variant_order

    variants = []
    for ratio, pooling in variant_order():
        trained = has_layout(trained_dir(embedded_config(ratio, pooling)))
        variants.append(Variant(EMBEDDED_FAMILY, "embedded", ratio, pooling, trained,
                                shipped_quality(ratio, pooling) if trained else None))
    return variants


def checkpoint_variant(spec: str) -> Variant:
    """A directory (or hub id) in the published layout, fixed to its own ratio and pooling."""
    from model.loading import resolve

    config = resolve(spec).config
    return Variant(CHECKPOINT_FAMILY, spec, config.compression_ratio, config.pooling, config.trained)


def build_catalog(checkpoints: Sequence[str] = ()) -> Catalog:
    """The given checkpoints first (the first is the default), then the embedded family."""
    variants: list[Variant] = []
    for spec in checkpoints:
        if spec in ("", "embedded"):
            continue
        variant = checkpoint_variant(spec)
        for other in variants:
            if (other.ratio, other.pooling) == (variant.ratio, variant.pooling):
                raise UserError(f"--checkpoint {other.spec} and {spec} are both {variant.label}; give one of them")
        variants.append(variant)
    variants += embedded_variants()
    return Catalog(variants)
