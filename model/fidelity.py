"""How faithfully a reconstruction reproduces its source, in tokens: shared by the studio's
Reconstruction tab, the quality benchmark and training's validation."""

from __future__ import annotations

import difflib


def token_accuracy(reference: list[int], generated: list[int]) -> float:
    """Share of reference tokens reproduced, in order: matched tokens of the longest
    alignment (difflib, no junk heuristics) over the reference length."""
    if not reference:
        return 1.0 if not generated else 0.0
    matcher = difflib.SequenceMatcher(a=reference, b=generated, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()) / len(reference)
