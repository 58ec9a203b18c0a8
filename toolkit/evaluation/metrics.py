"""Task metrics from the reference libraries lm-eval uses: ROUGE-L (rouge-score), EM/F1 (the SQuAD v1.1
script as shipped in lm-eval), chrF (sacreBLEU), accuracy, perplexity.

All scores are higher-is-better in [0, 1] (chrF is sacreBLEU's score / 100), except perplexity, which is
reported as its own metric (lower is better). ``first-eval`` scores through lm-eval (``lm_eval_tasks``);
these helpers compute the same values for one prediction or a list of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "normalize_answer",
    "exact_match",
    "token_f1",
    "squad_em_f1",
    "rouge_l",
    "accuracy",
    "chrf",
    "perplexity",
]


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and articles, squeeze spaces."""
    from lm_eval.tasks.qasper.metrics import normalize_answer as norm

    return norm(text)


def exact_match(prediction: str, gold: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    from firstkit.evaluation.lm_eval_tasks import squad_em

    return squad_em(prediction, [gold] if isinstance(gold, str) else list(gold))


def token_f1(prediction: str, gold: str | Sequence[str]) -> float:
    """SQuAD token-overlap F1, maximised over the gold answers."""
    from firstkit.evaluation.lm_eval_tasks import squad_f1

    return squad_f1(prediction, [gold] if isinstance(gold, str) else list(gold))


def squad_em_f1(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> tuple[float, float]:
    """Mean EM and F1 over a data set (both in [0, 1])."""
    if len(predictions) != len(golds):
        raise ValueError("predictions and golds differ in length")
    if not predictions:
        return 0.0, 0.0
    em = sum(exact_match(p, g) for p, g in zip(predictions, golds, strict=True)) / len(predictions)
    f1 = sum(token_f1(p, g) for p, g in zip(predictions, golds, strict=True)) / len(predictions)
    return em, f1


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of ``rouge-score`` (Porter stemmer), as lm-eval's summarisation tasks."""
    from firstkit.evaluation.lm_eval_tasks import rouge_l as rl

    return rl(prediction, reference)


def accuracy(predictions: Sequence[int], golds: Sequence[int]) -> float:
    """Fraction of predictions equal to gold labels."""
    if len(predictions) != len(golds):
        raise ValueError("predictions and golds differ in length")
    if not predictions:
        return 0.0
    return sum(int(p == g) for p, g in zip(predictions, golds, strict=True)) / len(predictions)


def chrf(hypotheses: Sequence[str], references: Sequence[str], char_order: int = 6, word_order: int = 0,
         beta: float = 2.0) -> float:
    """Corpus-level chrF of sacreBLEU (chrF++ with ``word_order=2``), in [0, 1]."""
    from sacrebleu.metrics import CHRF

    if len(hypotheses) != len(references):
        raise ValueError("hypotheses and references differ in length")
    metric = CHRF(char_order=char_order, word_order=word_order, beta=beta)
    return metric.corpus_score(list(hypotheses), [list(references)]).score / 100.0


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(total negative log-likelihood / number of scored tokens)."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(total_nll / n_tokens)
