"""Task metrics in plain Python / numpy: ROUGE-L, EM/F1 (SQuAD), accuracy, chrF, perplexity.

All scores are higher-is-better in [0, 1] (100 for chrF-style percentages is *not* used: chrF is
returned in [0, 1] too), except perplexity, which is reported as its own metric (lower is better).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
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

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1_single(prediction: str, gold: str) -> float:
    pred_toks = normalize_answer(prediction).split()
    gold_toks = normalize_answer(gold).split()
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    common = Counter(pred_toks) & Counter(gold_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_toks)
    recall = same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, gold: str | Sequence[str]) -> float:
    """SQuAD token-overlap F1, maximised over the gold answers."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    return max(_f1_single(prediction, g) for g in golds)


def squad_em_f1(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> tuple[float, float]:
    """Mean EM and F1 over a data set (both in [0, 1])."""
    if len(predictions) != len(golds):
        raise ValueError("predictions and golds differ in length")
    if not predictions:
        return 0.0, 0.0
    em = sum(exact_match(p, g) for p, g in zip(predictions, golds, strict=True)) / len(predictions)
    f1 = sum(token_f1(p, g) for p, g in zip(predictions, golds, strict=True)) / len(predictions)
    return em, f1


def _lcs_len(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (sentence level, LCS over lower-cased alphanumeric tokens, beta = 1)."""
    p = _ROUGE_TOKEN.findall(prediction.lower())
    r = _ROUGE_TOKEN.findall(reference.lower())
    lcs = _lcs_len(p, r)
    if lcs == 0:
        return 0.0
    precision = lcs / len(p)
    recall = lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def accuracy(predictions: Sequence[int], golds: Sequence[int]) -> float:
    """Fraction of predictions equal to gold labels."""
    if len(predictions) != len(golds):
        raise ValueError("predictions and golds differ in length")
    if not predictions:
        return 0.0
    return sum(int(p == g) for p, g in zip(predictions, golds, strict=True)) / len(predictions)


def _char_ngrams(text: str, n: int) -> Counter[str]:
    text = "".join(text.split())  # chrF ignores whitespace
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def _word_ngrams(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def chrf(hypotheses: Sequence[str], references: Sequence[str], char_order: int = 6,
         word_order: int = 0, beta: float = 2.0) -> float:
    """Corpus-level chrF (chrF++ with ``word_order=2``) as in sacreBLEU, in [0, 1].

    Statistics of every n-gram order are summed over the corpus, then precision and recall are
    averaged over the orders and combined into an F-beta score.
    """
    if len(hypotheses) != len(references):
        raise ValueError("hypotheses and references differ in length")
    orders = char_order + word_order
    match = [0] * orders
    hyp_tot = [0] * orders
    ref_tot = [0] * orders
    for hyp, ref in zip(hypotheses, references, strict=True):
        for k in range(char_order):
            h, r = _char_ngrams(hyp, k + 1), _char_ngrams(ref, k + 1)
            match[k] += sum((h & r).values())
            hyp_tot[k] += sum(h.values())
            ref_tot[k] += sum(r.values())
        hw, rw = hyp.split(), ref.split()
        for k in range(word_order):
            h, r = _word_ngrams(hw, k + 1), _word_ngrams(rw, k + 1)
            match[char_order + k] += sum((h & r).values())
            hyp_tot[char_order + k] += sum(h.values())
            ref_tot[char_order + k] += sum(r.values())
    precs, recs = [], []
    for k in range(orders):
        if hyp_tot[k] > 0 and ref_tot[k] > 0:
            precs.append(match[k] / hyp_tot[k])
            recs.append(match[k] / ref_tot[k])
    if not precs:
        return 0.0
    p = sum(precs) / len(precs)
    r = sum(recs) / len(recs)
    if p + r == 0:
        return 0.0
    b2 = beta * beta
    return (1 + b2) * p * r / (b2 * p + r)


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(total negative log-likelihood / number of scored tokens)."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(total_nll / n_tokens)
