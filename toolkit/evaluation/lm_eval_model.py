"""``firstkit`` model for EleutherAI's lm-evaluation-harness (``lm-eval``).

``lm_eval --model firstkit --model_args model=M,routers=R,mask=auto --tasks ...``

FiRST semantics, for every request type: the routers decide the layer mask **once, from the request's
context**, and the mask holds for the whole sequence:

* ``loglikelihood`` (and ``multiple_choice``): the context (the part of the scored window before the
  continuation) decides; the continuation is scored under that mask. Every choice of a question gets
  the same mask, because they share the context.
* ``generate_until``: the prompt decides at prefill; the mask is frozen for every generated token.
* ``loglikelihood_rolling`` (perplexity of whole documents): a document has no separate context, so the
  first ``rolling_prompt`` tokens of the document decide (the prefix the routers of a deployed model
  would see) and the mask holds for every window of the document. Those tokens are scored too, as in
  lm-eval's standard tasks; the routers' choice can therefore depend on at most ``rolling_prompt``
  tokens that are also scored (at most L bits of information, on documents of thousands of tokens).

Tokenization, windowing, truncation and text post-processing follow lm-eval's ``hf`` model (HFLM), so
``routers=none,mask=all`` scores what ``--model hf`` scores on the same weights.

Registration: lm-eval 0.4.13 has no plugin discovery (its model registry is a fixed table,
``lm_eval/models/__init__.py``). firstkit declares the entry point ``firstkit`` in the ``lm_eval.models``
group (for lm-eval releases that load plugins) and registers the model whenever this module is imported.
With 0.4.13 that happens (a) in ``first-lm-eval`` (lm-eval's own CLI, after loading every installed
``lm_eval.models`` entry point), (b) in plain ``lm_eval`` when the task files written by
``python -m firstkit.evaluation.lm_eval_tasks`` are passed by path (their ``process_docs`` imports
firstkit before lm-eval resolves ``--model``), (c) in Python after ``import firstkit.evaluation.lm_eval_model``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from firstkit.evaluation.masks import fixed_mask
from firstkit.routed_model import FirstModel, RoutedCache, _pick, eos_ids, load_model

__all__ = ["FirstLM", "BundleLM", "register", "default_routers", "load_system_model", "cli", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "lm_eval.models"
DEFAULT_MAX_LENGTH = 2048
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_routers(model: str, budget: float | None = None) -> str | None:
    """The shipped routers ``first-export`` uses for ``model``: the ``-lora`` checkpoint (adapter merged)
    at ``budget`` (default: the shipped default budget), else the routers-only one, else None."""
    from firstkit.routers import default_routers_path

    path = default_routers_path(model, budget, lora=True) or default_routers_path(model, budget)
    return str(path) if path is not None and Path(path).is_dir() else None


def load_system_model(model: str, routers: str | None = "auto", lora: str | None = "auto",
                      budget: float | None = None, dtype: torch.dtype = torch.float32) -> FirstModel:
    """``load_model`` plus the routers / LoRA choice of the adapter.

    ``routers``: ``"auto"`` = ``default_routers(model, budget)``, ``None``/``"none"`` = no routers, or a
    checkpoint folder. ``lora``: ``"auto"`` merges the adapter of a routers folder that has one (as
    ``first-export`` does), ``None``/``"none"`` merges nothing, a folder merges its adapter.
    """
    from firstkit.training.lora import apply_lora, has_lora

    if routers == "auto":
        routers = default_routers(model, budget)
    elif routers in (None, "none"):
        routers = None
    elif not Path(str(routers)).is_dir():
        raise FileNotFoundError(f"router checkpoint {routers} does not exist")
    fm = load_model(model, routers=routers, dtype=dtype)
    if lora == "auto":
        lora = routers if routers is not None and has_lora(routers) else None
    elif lora == "none":
        lora = None
    if lora is not None:
        apply_lora(fm, lora)
        fm.info.extra["lora_merged_from"] = str(lora)
    return fm


class FirstLM(TemplateLM):
    """A ``FirstModel`` behind lm-eval's ``LM`` interface (see the module docstring for the semantics).

    ``model``: a named model, Hugging Face folder or ``.gguf`` (as ``firstkit.load_model``), or a loaded
    ``FirstModel`` (Python API; then ``routers``/``lora`` default to what it already holds).
    ``routers``: ``auto`` (default: the shipped default of ``first-export``, routers + merged LoRA),
    ``none``, or a checkpoint folder. ``mask``: ``auto`` (routers decide; all layers without routers),
    ``all``, ``static`` | ``uniform`` | ``random`` | ``last-k`` with ``skip=`` (ratio < 1 or a number of
    layers), or 0/1 bits (quote them when they start with 0: ``mask='0111...'``). ``bundle=DIR`` scores an
    exported bundle instead (``BundleLM``).
    """

    backend = "causal"

    def __new__(cls, *args: Any, **kwargs: Any) -> FirstLM:
        # bundle=DIR scores an exported bundle instead (same request semantics): see ``BundleLM``
        if cls is FirstLM and kwargs.get("bundle"):
            return super().__new__(BundleLM)
        return super().__new__(cls)

    def __init__(self, model: str | FirstModel = "smollm2-135m-instruct", routers: str | None = "auto",
                 mask: str | int = "auto", skip: float | int | None = None, lora: str | None = "auto",
                 budget: float | None = None, seed: int = 0, data_dir: str | None = None, rolling_prompt: int = 64,
                 batch_size: int | str = 1, max_length: int | None = None, max_gen_toks: int = 256,
                 device: str | None = None, dtype: str = "float32", threads: int | None = None,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None, progress: bool = True,
                 scored_logits: bool = False, **kwargs: Any) -> None:
        super().__init__()
        kwargs.pop("max_batch_size", None)
        if kwargs.pop("bundle", None):
            raise ValueError("bundle= cannot be combined with a loaded model")
        if kwargs:
            raise ValueError(f"unknown firstkit model_args: {', '.join(sorted(kwargs))}")
        if threads:
            torch.set_num_threads(int(threads))
        if isinstance(model, FirstModel):
            fm = model
            if routers not in ("auto", None, "none") or lora not in ("auto", None, "none"):
                raise ValueError("routers= / lora= apply to a model name or folder, not to a loaded FirstModel")
            if routers in (None, "none"):
                fm = _without_routers(fm)
        else:
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}")
            fm = load_system_model(str(model), routers, lora, budget, _DTYPES[dtype])
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's CLI defaults to cuda; as HFLM, fall back to the CPU
        if device:
            fm = fm.to(device)
        if fm.tokenizer is None:
            raise ValueError(f"model {model} has no tokenizer")
        self.model = fm.eval()
        self.tokenizer = fm.tokenizer
        self.mask_name = str(mask)  # lm-eval parses bits such as 1111.. as an int
        self.skip = skip
        self.fixed = fixed_mask(fm, self.mask_name, skip, seed, data_dir)
        if self.fixed is not None:
            self.fixed = self.fixed.to(fm.device)
        self.progress = bool(progress)
        #: True: the LM head runs only at scored positions (faster; log-likelihoods then differ from ``hf``'s by
        #: float32 round-off, ~1e-5); False (default): logits of every position, exactly as lm-eval's ``hf``
        self.scored_logits = bool(scored_logits)
        self.rolling_prompt = int(rolling_prompt)
        if self.rolling_prompt < 1:
            raise ValueError("rolling_prompt must be >= 1")
        self._batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._decided: dict[tuple[int, ...], torch.Tensor] = {}
        #: (task name, doc id) -> mask [L] bool of that document's requests (what actually ran; the choices of a
        #: question share their context, hence their mask; with per-choice contexts, the last request's)
        self.mask_log: dict[tuple[str | None, int | None], list[bool]] = {}
        #: (task name, doc id) -> tokens the routers saw (the context) for that document
        self.prompt_log: dict[tuple[str | None, int | None], int] = {}
        #: (task name, doc id) -> tokens scored by loglikelihood_rolling (for token-level perplexity)
        self.rolling_tokens: dict[tuple[str | None, int | None], int] = {}

    # ------------------------------------------------------------------ lm-eval properties
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return resolve_max_length(self.model.config, self.tokenizer, default=DEFAULT_MAX_LENGTH)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """As HFLM: the tokenizer's default special tokens unless told, none when the text starts with BOS."""
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        enc = self.tokenizer.encode(string, **special)
        return enc[-left_truncate_len:] if left_truncate_len else enc

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        info = self.model.info
        routers = self.model.routers
        return {"firstkit_model": getattr(info, "model_id", None), "firstkit_mask": self.mask_name,
                "firstkit_skip": self.skip, "firstkit_routers": None if routers is None else routers.meta.get("path"),
                "firstkit_lora": info.extra.get("lora_merged_from") if hasattr(info, "extra") else None,
                "num_layers": self.model.num_layers}

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def decide(self, context: Sequence[int]) -> torch.Tensor:
        """The mask [L] for a request whose context is ``context`` (fixed, or the routers' prefill decision)."""
        if self.fixed is not None:
            return self.fixed
        if self.model.routers is None:
            return torch.ones(self.model.num_layers, dtype=torch.bool, device=self.device)
        key = tuple(int(t) for t in context)
        if key not in self._decided:
            ids = torch.tensor([key], dtype=torch.long, device=self.device)
            self._decided[key] = self.model.forward(ids, logits_to_keep=1).mask[0]
            if len(self._decided) > 4096:
                self._decided.pop(next(iter(self._decided)))
        return self._decided[key]

    def _log(self, req: Instance | None, mask: torch.Tensor, prompt_tokens: int) -> None:
        if req is not None:
            self.mask_log[(req.task_name, req.doc_id)] = mask.bool().tolist()
            self.prompt_log[(req.task_name, req.doc_id)] = int(prompt_tokens)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _score(self, items: list[tuple[list[int], list[int], torch.Tensor]],
               progress: tqdm | None = None) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether it is the greedy one) for (context, continuation,
        mask) items, batched longest first; each row runs under its own mask."""
        out: list[tuple[float, bool] | None] = [None] * len(items)
        order = sorted(range(len(items)), key=lambda i: -(len(items[i][0]) + len(items[i][1])))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            inps, conts = [], []
            for i in chunk:
                ctx, cont, _ = items[i]
                if not cont or len(cont) > self.max_length:
                    raise ValueError(f"continuation of {len(cont)} tokens (max_length {self.max_length})")
                inps.append((ctx + cont)[-(self.max_length + 1) :][:-1])
                conts.append(cont)
            width = max(len(x) for x in inps)
            ids = torch.zeros(len(chunk), width, dtype=torch.long, device=self.device)
            attn = torch.zeros_like(ids)
            for b, x in enumerate(inps):
                ids[b, : len(x)] = torch.tensor(x, device=self.device)
                attn[b, : len(x)] = 1
            masks = torch.stack([items[i][2].to(self.device) for i in chunk])
            keep = max(width - len(x) + len(c) for x, c in zip(inps, conts, strict=True)) if self.scored_logits else 0
            logits = self.model.forward(ids, attention_mask=attn, mask=masks, logits_to_keep=keep).logits
            for b, i in enumerate(chunk):
                n, c = len(inps[b]), len(conts[b])
                lo = logits.shape[1] - width + n - c  # logits_to_keep=0 keeps all: shape[1] == width
                logp = torch.log_softmax(logits[b, lo : lo + c].float(), dim=-1)
                target = torch.tensor(conts[b], device=self.device)
                greedy = bool((logp.argmax(-1) == target).all())
                out[i] = (float(logp.gather(-1, target[:, None]).sum()), greedy)
                if progress is not None:
                    progress.update(1)
        return out  # type: ignore[return-value]

    def _context_in_window(self, ctx: list[int], cont: list[int]) -> list[int]:
        """The context tokens that survive left truncation of ``ctx + cont`` to the model's window."""
        window = (ctx + cont)[-(self.max_length + 1) :][:-1]
        seen = window[: max(0, len(window) - len(cont) + 1)]
        return seen or window[:1]

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        items = [(ctx, cont, self.decide(self._context_in_window(ctx, cont))) for _, ctx, cont in requests]
        return self._score(items)

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        encoded = []
        for req in requests:
            context, continuation = req.args
            if context == "":
                cont = self.tok_encode(continuation, add_special_tokens=False)
                ctx, cont = ([self.prefix_token_id], cont) if self.prefix_token_id != cont[0] else (cont[:1], cont[1:])
            else:
                ctx, cont = self._encode_pair(context, continuation)
            encoded.append((ctx, cont))
        items = []
        for req, (ctx, cont) in zip(requests, encoded, strict=True):
            seen = self._context_in_window(ctx, cont)
            mask = self.decide(seen)
            self._log(req, mask, len(seen))
            items.append((ctx, cont, mask))
        bar = tqdm(total=len(items), disable=disable_tqdm or not self.progress, desc="firstkit loglikelihood")
        res = self._score(items, bar)
        bar.close()
        for req, answer in zip(requests, res, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, answer)
        return res

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm or not self.progress, desc="firstkit loglikelihood_rolling"):
            (string,) = req.args
            tokens = self.tok_encode(string)
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]
            prompt = ([self.prefix_token_id] + tokens)[: self.rolling_prompt]
            mask = self.decide(prompt)
            self._log(req, mask, len(prompt))
            self.rolling_tokens[(req.task_name, req.doc_id)] = len(tokens)
            total = sum(ll for ll, _ in self._score([(ctx, cont, mask) for ctx, cont in windows]))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        res: list[str | None] = [None] * len(requests)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm or not self.progress, desc="firstkit generate_until")
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks {max_gen} must be below max_length {self.max_length}")
            idx = sorted(idx, key=lambda i: -len(self.tok_encode(requests[i].args[0])))
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in chunk], [requests[i] for i in chunk],
                                       until, max_gen, max_ctx, kwargs)
                for i, text in zip(chunk, texts, strict=True):
                    res[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(1)
        bar.close()
        return res  # type: ignore[return-value]

    def _encode_batch(self, contexts: list[str], max_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded batch, as HFLM.tok_batch_encode (special tokens decided on the first string)."""
        special: dict[str, bool] = {}
        if has_bos_prefix(contexts[0], getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        rows = [self.tokenizer(c, **special).input_ids[-max_ctx:] for c in contexts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        ids = torch.full((len(rows), width), int(pad), dtype=torch.long, device=self.device)
        attn = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            if r:
                ids[b, width - len(r) :] = torch.tensor(r, device=self.device)
                attn[b, width - len(r) :] = 1
        return ids, attn

    def _generate(self, contexts: list[str], reqs: list[Instance], until: list[str], max_gen: int, max_ctx: int,
                  kwargs: dict[str, Any]) -> list[str]:
        model = self.model
        ids, attn = self._encode_batch(contexts, max_ctx)
        do_sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature", 1.0) or 1.0)
        generator = torch.Generator(device=ids.device)
        if kwargs.get("seed") is not None:
            generator.manual_seed(int(kwargs["seed"]))
        eos = eos_ids(None, model.base, self.tokenizer)
        cache = RoutedCache(config=model.base.config)
        if self.fixed is not None:
            mask = self.fixed[None].expand(len(contexts), -1)
        elif model.routers is None:
            mask = torch.ones(len(contexts), model.num_layers, dtype=torch.bool, device=ids.device)
        else:
            mask = None  # the routers decide in this prefill, per row, over the prompt tokens
        out = model.forward(ids, attention_mask=attn, mask=mask, cache=cache, logits_to_keep=1)
        frozen = out.mask
        for req, row, n in zip(reqs, frozen, attn.sum(1).tolist(), strict=True):
            self._log(req, row, n)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)[:, -1:]
        logits = out.logits[:, -1, :]
        gen: list[list[int]] = [[] for _ in contexts]
        done = [False] * len(contexts)
        for step in range(max_gen):
            nxt = _pick(logits, do_sample, temperature, kwargs.get("top_k"), kwargs.get("top_p"), generator)
            for b, tok in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                gen[b].append(tok)
                if tok in eos or any(s and s in self.tok_decode(gen[b][-16:]) for s in until):
                    done[b] = True
            if all(done) or step == max_gen - 1:
                break
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            positions = positions + 1
            logits = model.forward(nxt[:, None], attention_mask=attn, mask=frozen, cache=cache,
                                   position_ids=positions, logits_to_keep=1).logits[:, -1, :]
        return [postprocess_generated_text(self.tok_decode(g), until, None) for g in gen]


class BundleLM(FirstLM):
    """An exported bundle (``first-export``) behind lm-eval: the quantized program a phone runs.

    ``bundle=DIR`` (``backend=executorch`` | ``onnx``). The bundle's own routers decide in its own ``prefill``
    (``mask=auto``), or ``mask=all`` / 0/1 bits force a mask through ``mask_override``. Scoring a
    continuation = prefill of the context under the mask, then one ``decode_step`` per continuation token
    (the runtime's decode loop), so the log-likelihoods are those of the exported graphs; windows are capped
    at the bundle's ``max_seq_len``. Requests run one at a time (the program holds one KV cache).
    """

    def __init__(self, bundle: str, backend: str = "executorch", mask: str | int = "auto",
                 rolling_prompt: int = 64, max_length: int | None = None, max_gen_toks: int = 256,
                 threads: int | None = None, add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 progress: bool = True, **kwargs: Any) -> None:
        TemplateLM.__init__(self)
        for k in ("batch_size", "max_batch_size", "device", "model"):
            kwargs.pop(k, None)
        if kwargs:
            raise ValueError(f"model_args not available with bundle=: {', '.join(sorted(kwargs))}")
        from firstkit.mask_spec import parse_mask_spec
        from firstkit.runtime.runner import load_bundle

        self.runner = load_bundle(bundle, backend=backend, threads=threads)
        if self.runner.tokenizer is None:
            raise ValueError(f"bundle {bundle} has no tokenizer")
        self.model = None  # no eager model: everything runs in the bundle
        self.tokenizer = self.runner.tokenizer
        self.mask_name = str(mask)
        parse_mask_spec(self.mask_name, self.runner.n_layers, self.runner.protected)  # fails early on bad specs
        self.skip = None
        self.fixed = None
        self.progress = bool(progress)
        self.rolling_prompt = int(rolling_prompt)
        self._batch_size = 1
        cap = int(self.runner.max_seq_len)
        self._max_length = min(int(max_length), cap) if max_length else cap
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._decided = {}
        self.mask_log = {}
        self.prompt_log = {}
        self.rolling_tokens = {}

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def get_model_info(self) -> dict[str, Any]:
        m = self.runner.manifest
        return {"firstkit_bundle": str(self.runner.path), "firstkit_backend": self.runner.backend_name,
                "firstkit_mask": self.mask_name, "quantization": m.get("quantization"),
                "bundle_sha256": self.runner.sha256, "num_layers": self.runner.n_layers}

    def decide(self, context: Sequence[int]) -> torch.Tensor:
        """The bundle's mask for ``context``: its routers' prefill decision, or the forced mask."""
        key = tuple(int(t) for t in context)
        if key not in self._decided:
            _, bits = self.runner.prefill(list(key), self.mask_name)
            self._decided[key] = torch.tensor(bits, dtype=torch.bool)
            if len(self._decided) > 4096:
                self._decided.pop(next(iter(self._decided)))
        return self._decided[key]

    def _score(self, items: list[tuple[list[int], list[int], torch.Tensor]],
               progress: tqdm | None = None) -> list[tuple[float, bool]]:
        out = []
        for ctx, cont, mask in items:
            if not cont or len(cont) > self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens (max_length {self.max_length})")
            window = (ctx + cont)[-(self.max_length + 1) :][:-1]
            n_ctx = len(window) - len(cont) + 1
            bits = "".join("1" if b else "0" for b in mask.tolist())
            logits, _ = self.runner.prefill(window[:n_ctx], bits)
            active = [i for i, b in enumerate(mask.tolist()) if b]
            total, greedy = 0.0, True
            for j, tok in enumerate(cont):
                logp = torch.log_softmax(logits.float(), dim=-1)
                total += float(logp[tok])
                greedy = greedy and int(logp.argmax()) == tok
                if j < len(cont) - 1:
                    logits = self.runner.backend.decode_step(tok, n_ctx + j, active)
            out.append((total, greedy))
            if progress is not None:
                progress.update(1)
        return out

    def _generate(self, contexts: list[str], reqs: list[Instance], until: list[str], max_gen: int, max_ctx: int,
                  kwargs: dict[str, Any]) -> list[str]:
        if kwargs.get("do_sample"):
            raise ValueError("bundle= generates greedily only (do_sample=False)")
        texts = []
        for context, req in zip(contexts, reqs, strict=True):
            ids, _ = self._encode_batch([context], min(max_ctx, self.max_length - max_gen + 1))
            prompt = ids[0].tolist()
            logits, bits = self.runner.prefill(prompt, self.mask_name)
            self._log(req, torch.tensor(bits, dtype=torch.bool), len(prompt))
            active = [i for i, b in enumerate(bits) if b]
            gen: list[int] = []
            for step in range(max_gen):
                tok = int(torch.argmax(logits))
                gen.append(tok)
                if tok in self.runner.eos_ids or any(s and s in self.tok_decode(gen[-16:]) for s in until):
                    break
                if step < max_gen - 1:
                    logits = self.runner.backend.decode_step(tok, len(prompt) + step, active)
            texts.append(postprocess_generated_text(self.tok_decode(gen), until, None))
        return texts


def _without_routers(model: FirstModel) -> FirstModel:
    """A view of ``model`` sharing its weights, with no routers."""
    import copy

    view = copy.copy(model)
    object.__setattr__(view, "_modules", dict(model._modules))
    view.routers = None
    return view


def register() -> None:
    """Register ``firstkit`` in lm-eval's model registry (idempotent)."""
    import lm_eval.models  # noqa: F401  (the built-in models first: lm-eval fills an empty registry only)

    if model_registry.get("firstkit", None) is not FirstLM:
        model_registry.register("firstkit", target=FirstLM)


def load_entry_points() -> list[str]:
    """Register every installed ``lm_eval.models`` entry point lm-eval does not know yet; returns the names."""
    from importlib.metadata import entry_points

    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in model_registry:
            model_registry.register(ep.name, target=ep)
            names.append(ep.name)
    return names


def cli() -> None:
    """``first-lm-eval``: lm-eval's own command line, with installed ``lm_eval.models`` plugins registered."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval.models  # noqa: F401  (fills the built-in registry first)
    from lm_eval.__main__ import cli_evaluate

    register()
    load_entry_points()
    cli_evaluate()


register()
