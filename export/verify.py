"""Verification of exported artifacts against the eager router-augmented model (FirstModel).

fp32: for each prompt and mask (all layers, the routers' own, a random valid one) the runtime's greedy
tokens equal eager greedy tokens and every step's logits are within ``atol`` of eager logits.
Quantized: token agreement (teacher-forced next-token argmax vs eager fp32) and, on a ~200-token text, the
perplexity of the runtime, of eager fp32 and (when the pipeline passes it) of the eager quantized model, so
that the quantization's own loss and an export error can be told apart.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
)
#: Plain prose for the perplexity check (~200 tokens with SmolLM2's tokenizer; the first quarter is prefilled).
PPL_TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the capital of "
    "Germany. Water boils at one hundred degrees Celsius at sea level. "
    "The river rises in the hills to the north of the town and flows south through farmland before it reaches "
    "the sea. In the nineteenth century the valley was known for its mills, which used the water to grind grain "
    "and later to spin cotton. When the railway arrived in 1850, the mills could send their goods to the cities "
    "much faster, and the population of the town doubled within twenty years. Most of the old buildings were "
    "closed after the Second World War, but several of them have since been turned into museums, shops and "
    "apartments. Today the river is popular with walkers and anglers, and a path follows its banks for most of "
    "its length. The local council has planted trees along the water to reduce flooding, and every summer the "
    "town holds a festival with music, food and boat races. Visitors often stay for a few days to explore the "
    "nearby villages, the castle on the hill and the long sandy beach at the mouth of the river."
)
#: mask kinds whose token agreement is the headline number: a random mask skips a third of the layers, which
#: leaves near-flat logits whose argmax flips under any perturbation (reported apart, not averaged in)
AGREEMENT_MASKS = ("all", "routers")


@dataclass
class CaseResult:
    """One (prompt, mask, backend) verification case."""

    backend: str
    prompt: int
    mask_kind: str
    mask: str
    eager_mask: str
    tokens_equal: bool
    max_abs_logit_diff: float
    token_agreement: float
    runtime_tokens: list[int] = field(default_factory=list)
    eager_tokens: list[int] = field(default_factory=list)
    tie_ok: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def verification_prompts(first_model, n_random: int = 3, seed: int = 0, max_len: int = 24) -> list[list[int]]:
    """Token-id prompts: chat-templated texts when there is a tokenizer, else seeded random ids."""
    if first_model.tokenizer is not None:
        return [first_model.encode_chat(p)[0].tolist() for p in DEFAULT_PROMPTS]
    g = random.Random(seed)
    vocab = first_model.config.vocab_size
    lengths = [1, max(2, max_len // 3), max_len][:n_random]
    return [[g.randrange(3, vocab) for _ in range(n)] for n in lengths]


def random_mask(first_model, seed: int = 0) -> str:
    """A valid random mask skipping about a third of the skippable layers (at least one)."""
    g = random.Random(seed)
    prot = set(first_model.protected_layers())
    skippable = [i for i in range(first_model.num_layers) if i not in prot]
    bits = [1] * first_model.num_layers
    if skippable:
        for i in g.sample(skippable, max(1, len(skippable) // 3)):
            bits[i] = 0
    return "".join(map(str, bits))


@torch.no_grad()
def _eager_logits(first_model, ids: list[int], mask_bits: str) -> torch.Tensor:
    """Eager logits [T, V] for every position of ``ids`` with a frozen mask."""
    out = first_model.forward(torch.tensor([ids]), mask=mask_bits)
    return out.logits[0].float()


@torch.no_grad()
def run_case(runner, first_model, ids: list[int], mask_arg: str, mask_kind: str, prompt_index: int,
             new_tokens: int, atol: float) -> CaseResult:
    """Greedy-decode with the runtime, compare tokens and per-step logits with eager."""
    logits, bits = runner.prefill(ids, mask_arg)
    mask_bits = "".join(map(str, bits))
    if mask_arg == "auto":
        eager_mask = "".join("1" if b else "0" for b in first_model.decide_mask(torch.tensor([ids])))
    else:
        eager_mask = "".join("1" if b == "1" else "0" for b in (
            mask_arg if mask_arg != "all" else "1" * first_model.num_layers))
    active = [i for i, b in enumerate(bits) if b]
    rt_tokens: list[int] = []
    rt_logits = [logits]
    for step in range(new_tokens):
        tok = int(torch.argmax(rt_logits[-1]))
        rt_tokens.append(tok)
        if step == new_tokens - 1 or len(ids) + step >= runner.max_seq_len:
            break
        rt_logits.append(runner.backend.decode_step(tok, len(ids) + step, active))
    seq = ids + rt_tokens[:-1]
    eager = _eager_logits(first_model, seq, mask_bits)[len(ids) - 1:]
    rt = torch.stack(rt_logits[: eager.shape[0]])
    diff = float((rt - eager).abs().max())
    agree = float((rt.argmax(-1) == eager.argmax(-1)).float().mean())
    eager_gen = first_model.generate(torch.tensor([ids]), max_new_tokens=len(rt_tokens), mask=mask_bits,
                                     eos_token_id=[-1])[0, len(ids):].tolist()
    equal = eager_gen == rt_tokens
    tie_ok = False
    if not equal:  # a flip at a near tie (eager top-2 margin below atol) is not a numerical failure
        k = next(j for j, (a, b) in enumerate(zip(eager_gen, rt_tokens, strict=False)) if a != b)
        top2 = torch.topk(eager[k], 2).values
        tie_ok = float(top2[0] - top2[1]) <= atol
    return CaseResult(runner.backend_name, prompt_index, mask_kind, mask_bits, eager_mask, equal, diff, agree,
                      rt_tokens, eager_gen, tie_ok)


def _compare(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    """Mean KL(ref || logits) per token and top-1 agreement of two [N, V] logit tensors."""
    lp, rp = logits.float().log_softmax(-1), ref.float().log_softmax(-1)
    return {"kl": float((rp.exp() * (rp - lp)).sum(-1).mean()),
            "top1_agreement": float((logits.argmax(-1) == ref.argmax(-1)).float().mean())}


@torch.no_grad()
def perplexity_delta(runner, first_model, ids: list[int], mask_arg: str = "all",
                     quantized_reference: torch.nn.Module | None = None) -> dict:
    """Teacher-forced perplexity of the runtime vs eager fp32 over the last three quarters of ``ids``.

    The first quarter is the prefill, the rest goes through the decode methods one token at a time.
    ``quantized_reference``: the eager quantized model (a causal LM run with all layers) that was exported;
    given, its perplexity and the runtime's KL to it are reported too (export error vs quantization loss).
    """
    ids = ids[: runner.max_seq_len]
    k = max(1, len(ids) // 4)
    logits, bits = runner.prefill(ids[:k], mask_arg)
    active = [i for i, b in enumerate(bits) if b]
    rt = [logits]
    for p in range(k, len(ids) - 1):
        rt.append(runner.backend.decode_step(ids[p], p, active))
    rt_logits = torch.stack(rt).float()
    targets = torch.tensor(ids[k:])
    mask_bits = "".join(map(str, bits))
    eager = _eager_logits(first_model, ids, mask_bits)[k - 1:len(ids) - 1]
    nll_rt = float(torch.nn.functional.cross_entropy(rt_logits, targets))
    nll_eager = float(torch.nn.functional.cross_entropy(eager, targets))
    fp = _compare(rt_logits, eager)
    out = {"tokens": len(targets), "ppl_runtime": math.exp(nll_rt), "ppl_eager_fp32": math.exp(nll_eager),
           "ppl_delta": math.exp(nll_rt) - math.exp(nll_eager),
           "ppl_ratio": math.exp(nll_rt - nll_eager),
           "kl_vs_eager_fp32": fp["kl"], "top1_agreement_vs_eager_fp32": fp["top1_agreement"],
           "mask": mask_bits}
    if quantized_reference is not None and all(bits):
        eq = quantized_reference(torch.tensor([ids])).logits[0, k - 1:len(ids) - 1].float()
        nll_q = float(torch.nn.functional.cross_entropy(eq, targets))
        q = _compare(rt_logits, eq)
        out.update({"ppl_eager_quantized": math.exp(nll_q), "kl_vs_eager_quantized": q["kl"],
                    "top1_agreement_vs_eager_quantized": q["top1_agreement"]})
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def verify_bundle(runner, first_model, quantized: bool, new_tokens: int = 8, atol: float = 1e-3,
                  seed: int = 0, quantized_reference: torch.nn.Module | None = None) -> dict:
    """All verification cases for one backend; ``passed`` says whether the bundle may be published.

    ``quantized_reference``: the eager quantized model behind a quantized bundle (see ``perplexity_delta``).
    """
    prompts = verification_prompts(first_model, seed=seed)
    prompts = [p[: runner.max_seq_len] for p in prompts]
    masks = [("all", "all")]
    if first_model.routers is not None:
        masks.append(("routers", "auto"))
    masks.append(("random", random_mask(first_model, seed)))
    cases = []
    for pi, ids in enumerate(prompts):
        for kind, m in masks:
            cases.append(run_case(runner, first_model, ids, m, kind, pi, new_tokens, atol))
    masks_match = all(c.mask == c.eager_mask for c in cases)
    finite = all(math.isfinite(c.max_abs_logit_diff) for c in cases)
    result: dict = {
        "backend": runner.backend_name,
        "quantized": quantized,
        "atol": atol,
        "new_tokens": new_tokens,
        "cases": [c.as_dict() for c in cases],
        "masks_match_eager": masks_match,
        "max_abs_logit_diff": max(c.max_abs_logit_diff for c in cases),
        "token_agreement": _mean([c.token_agreement for c in cases if c.mask_kind in AGREEMENT_MASKS]),
        "token_agreement_masks": list(AGREEMENT_MASKS),
        "token_agreement_by_mask": {kind: _mean([c.token_agreement for c in cases if c.mask_kind == kind])
                                    for kind, _ in masks},
        "greedy_tokens_equal": sum(c.tokens_equal for c in cases),
        "cases_total": len(cases),
    }
    if quantized:
        text_ids = (first_model.tokenizer(PPL_TEXT).input_ids if first_model.tokenizer is not None
                    else [t for p in prompts for t in p])
        result["perplexity"] = perplexity_delta(runner, first_model, list(text_ids), "all", quantized_reference)
        result["passed"] = finite
        result["criterion"] = "finite logits (quantized: agreement and perplexity delta are reported)"
    else:
        ok = all(c.tokens_equal or c.tie_ok for c in cases)
        result["passed"] = finite and masks_match and ok and result["max_abs_logit_diff"] <= atol
        result["criterion"] = (f"fp32: greedy tokens equal eager (near ties within atol excepted), masks equal "
                               f"eager, max |logit diff| <= {atol}")
    return result
