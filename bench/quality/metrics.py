"""Text-fidelity metrics for reconstruction: token accuracy (app.engine.service's definition),
BLEU (sacrebleu) and ROUGE-L F1 on whitespace words."""

from __future__ import annotations


def rouge_l(reference: str, hypothesis: str) -> float:
    """ROUGE-L F1 (beta = 1) of whitespace-separated words, from their longest common subsequence."""
    ref, hyp = reference.split(), hypothesis.split()
    if not ref or not hyp:
        return float(ref == hyp)
    previous = [0] * (len(hyp) + 1)
    for r in ref:
        current = [0]
        for j, h in enumerate(hyp):
            current.append(previous[j] + 1 if r == h else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu(references: list[str], hypotheses: list[str]) -> float:
    """Corpus BLEU (sacrebleu defaults, 0-100)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)
