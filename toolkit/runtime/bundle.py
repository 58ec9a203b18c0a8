"""Bundle manifest: schema constants, hashing, and validation before anything is loaded.

The full format is documented in docs/bundle_format.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from firstkit.hashing import sha256_file

BUNDLE_FORMAT = "firstkit-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PTE_FILE = "model.pte"
ONNX_DIR = "onnx"
TOKENIZER_DIR = "tokenizer"
BACKENDS = ("executorch", "onnx")

#: keys every manifest has (top level)
REQUIRED_KEYS = ("format", "format_version", "model", "routing", "max_seq_len", "quantization", "backends",
                 "mask_semantics", "versions", "files")
REQUIRED_MODEL_KEYS = ("id", "sha256", "architecture", "num_layers", "hidden_size", "vocab_size", "eos_ids")


class BundleError(ValueError):
    """A bundle is missing, malformed, corrupt, or does not match its manifest."""


def file_table(root: str | os.PathLike) -> dict[str, dict]:
    """``{relative posix path: {"sha256", "size"}}`` for every file under ``root`` except the manifest."""
    root = Path(root)
    out: dict[str, dict] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(root).as_posix()
            out[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


def read_manifest(bundle: str | os.PathLike, check_hashes: bool = True) -> dict:
    """Load and validate ``manifest.json``; with ``check_hashes`` every listed file's size and sha256."""
    root = Path(bundle)
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root}: no {MANIFEST} (not a firstkit bundle)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: invalid JSON ({e})") from e
    validate_manifest(manifest, str(mpath))
    if check_hashes:
        for rel, entry in manifest["files"].items():
            p = root / rel
            if not p.is_file():
                raise BundleError(f"{root}: file {rel} listed in the manifest is missing")
            size = p.stat().st_size
            if size != entry["size"]:
                raise BundleError(f"{root}: {rel} has {size} bytes, manifest says {entry['size']} (truncated?)")
            digest = sha256_file(p)
            if digest != entry["sha256"]:
                raise BundleError(f"{root}: sha256 of {rel} does not match the manifest (corrupt or modified)")
    return manifest


def validate_manifest(manifest: dict, where: str = MANIFEST) -> None:
    """Schema check (keys, types, consistency); raises ``BundleError`` naming the first problem."""
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: manifest must be a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{where}: missing keys {', '.join(missing)}")
    if manifest["format"] != BUNDLE_FORMAT:
        raise BundleError(f"{where}: format is {manifest['format']!r}, expected {BUNDLE_FORMAT!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{where}: format_version {manifest['format_version']} is not supported "
                          f"(this firstkit reads version {FORMAT_VERSION})")
    model = manifest["model"]
    if not isinstance(model, dict) or any(k not in model for k in REQUIRED_MODEL_KEYS):
        raise BundleError(f"{where}: model must have keys {', '.join(REQUIRED_MODEL_KEYS)}")
    n = model["num_layers"]
    if not isinstance(n, int) or n < 1:
        raise BundleError(f"{where}: model.num_layers must be a positive integer")
    if not isinstance(manifest["max_seq_len"], int) or manifest["max_seq_len"] < 1:
        raise BundleError(f"{where}: max_seq_len must be a positive integer")
    routing = manifest["routing"]
    if not isinstance(routing, dict) or "policy" not in routing or "protected_layers" not in routing:
        raise BundleError(f"{where}: routing must have policy and protected_layers")
    if any(not (0 <= i < n) for i in routing["protected_layers"]):
        raise BundleError(f"{where}: routing.protected_layers out of range for {n} layers")
    backends = manifest["backends"]
    if not isinstance(backends, dict) or not backends or set(backends) - set(BACKENDS):
        raise BundleError(f"{where}: backends must be a non-empty object with keys from {BACKENDS}")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{where}: files must be an object")
    for rel, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or "size" not in entry:
            raise BundleError(f"{where}: files[{rel!r}] needs sha256 and size")
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise BundleError(f"{where}: files[{rel!r}] escapes the bundle")
    et = backends.get("executorch")
    if et is not None:
        if et.get("file") not in files:
            raise BundleError(f"{where}: backends.executorch.file is not listed under files")
        expected = {"prefill", "embed", "head", *(f"layer_{i}" for i in range(n))}
        if set(et.get("methods", {})) != expected:
            raise BundleError(f"{where}: backends.executorch.methods must be prefill, embed, layer_0..layer_{n - 1}, "
                              "head")
    ox = backends.get("onnx")
    if ox is not None:
        for key in ("prefill", "decode"):
            if ox.get(key, {}).get("file") not in files:
                raise BundleError(f"{where}: backends.onnx.{key}.file is not listed under files")


def manifest_sha256(bundle: str | os.PathLike) -> str:
    """sha256 of ``manifest.json`` (the bundle's identity in run results)."""
    return sha256_file(Path(bundle) / MANIFEST)
