"""Bundle manifest: schema constants, hashing, and validation before anything is loaded.

The full format is documented in docs/bundle_format.md.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

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


def one_line(text: object, limit: int = 300) -> str:
    """First line of ``text`` (an exception or a message), cut to ``limit`` characters."""
    lines = str(text).strip().splitlines()
    first = lines[0].strip() if lines else (type(text).__name__ if isinstance(text, BaseException) else "")
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _schema_dir() -> Path:
    from importlib.resources import files

    return Path(str(files("firstkit.device_bench") / "schemas"))


@functools.cache
def schema_validator(name: str) -> Any:
    """A jsonschema validator for ``device_bench/schemas/<name>`` (the schemas reference each other by ``$id``).

    Integers are strict: ``1.0`` and ``true`` are not integers (layer counts and indices are used as such).
    """
    import jsonschema
    from referencing import Registry, Resource

    docs = {p.name: json.loads(p.read_text()) for p in sorted(_schema_dir().glob("*.schema.json"))}
    registry = Registry().with_resources(
        (d["$id"], Resource.from_contents(d)) for d in docs.values() if "$id" in d)
    base = jsonschema.Draft202012Validator
    strict_int = base.TYPE_CHECKER.redefine(
        "integer", lambda _checker, v: isinstance(v, int) and not isinstance(v, bool))
    cls = jsonschema.validators.extend(base, type_checker=strict_int)
    return cls(docs[name], registry=registry)


def schema_error(value: object, name: str) -> str | None:
    """One line naming the first (most relevant) violation of schema ``name``, or None when ``value`` is valid."""
    from jsonschema.exceptions import best_match

    err = best_match(schema_validator(name).iter_errors(value))
    if err is None:
        return None
    where = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if p.isidentifier() else f"[{p!r}]")
                    for p in err.absolute_path).lstrip(".") or "(top level)"
    return one_line(f"{where}: {err.message}", 240)


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
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: invalid JSON ({one_line(e)})") from e
    except RecursionError:
        raise BundleError(f"{mpath}: invalid JSON (nested too deeply)") from None
    except OSError as e:
        raise BundleError(f"{mpath}: cannot read it ({one_line(e)})") from None
    validate_manifest(manifest, str(mpath))
    for rel, entry in manifest["files"].items():
        p = bundle_file(root, rel, must_exist=check_hashes)
        if check_hashes:
            assert p is not None
            size = p.stat().st_size
            if size != entry["size"]:
                raise BundleError(f"{root}: {rel} has {size} bytes, manifest says {entry['size']} (truncated?)")
            digest = sha256_file(p)
            if digest != entry["sha256"]:
                raise BundleError(f"{root}: sha256 of {rel} does not match the manifest (corrupt or modified)")
    return manifest


def bundle_file(root: str | os.PathLike, rel: str, must_exist: bool = True) -> Path | None:
    """Resolved path of the listed file ``rel``: a regular file inside the bundle (symlinks may not leave it).

    Returns None for a missing file when ``must_exist`` is False; raises ``BundleError`` otherwise.
    """
    root = Path(root)
    real_root = os.path.realpath(root)
    real = os.path.realpath(root / rel)
    if os.path.commonpath([real_root, real]) != real_root:
        raise BundleError(f"{root}: {rel} resolves outside the bundle (symlink to {real}); refusing to read it")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        if must_exist:
            raise BundleError(f"{root}: file {rel} listed in the manifest is missing") from None
        return None
    except OSError as e:
        raise BundleError(f"{root}: cannot read {rel} ({one_line(e)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{root}: {rel} is not a regular file")
    return Path(real)


def listed_files(manifest: dict, prefix: str = "") -> list[str]:
    """The relative paths the manifest lists (sorted), optionally only those under ``prefix``."""
    return sorted(rel for rel in manifest["files"] if rel.startswith(prefix))


def load_tokenizer(root: str | os.PathLike, manifest: dict):
    """The bundle's Hugging Face tokenizer, read from exactly the ``tokenizer/`` files the manifest lists.

    The listed files are copied (resolved inside the bundle, regular, sha256 checked on the copy) into a
    private folder and loaded from there, so an unlisted or swapped file is never read. None when the
    manifest lists no tokenizer; ``BundleError`` (one line) when it cannot be loaded.
    """
    root = Path(root)
    rels = listed_files(manifest, TOKENIZER_DIR + "/")
    if not rels:
        return None
    with tempfile.TemporaryDirectory(prefix="firstkit-tokenizer-") as td:
        for rel in rels:
            src = bundle_file(root, rel)
            dst = Path(td) / rel[len(TOKENIZER_DIR) + 1:]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            if sha256_file(dst) != manifest["files"][rel]["sha256"]:
                raise BundleError(f"{root}: sha256 of {rel} does not match the manifest (corrupt or modified)")
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(td, local_files_only=True)
            tok.encode("firstkit", add_special_tokens=False)  # a tokenizer that loads but cannot encode is broken
        except Exception as e:  # noqa: BLE001 - transformers/tokenizers raise many types for bad files
            raise BundleError(f"{root}: the tokenizer in {TOKENIZER_DIR}/ cannot be loaded "
                              f"({type(e).__name__}: {one_line(e, 160)})") from None
    return tok


def validate_manifest(manifest: dict, where: str = MANIFEST) -> None:
    """Schema check (keys, types, consistency); raises ``BundleError`` naming the first problem (one line).

    The consistency rules below run first (their messages are the app's too), then the JSON schema
    ``device_bench/schemas/manifest.schema.json`` checks every type; a value of a type the rules do not
    expect is reported by the schema, never as a Python exception.
    """
    try:
        _check_consistency(manifest, where)
    except BundleError:
        raise
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
        problem = schema_error(manifest, "manifest.schema.json")
        raise BundleError(f"{where}: {problem or f'malformed manifest ({type(e).__name__}: {one_line(e, 120)})'}") \
            from None
    problem = schema_error(manifest, "manifest.schema.json")
    if problem:
        raise BundleError(f"{where}: {problem}")


def _check_consistency(manifest: dict, where: str) -> None:
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
        if set(et.get("methods", {})) != set(executorch_methods(n)):
            raise BundleError(f"{where}: backends.executorch.methods must be embed, route, prefill_0..prefill_{n - 1}, "
                              f"layer_0..layer_{n - 1}, head (a bundle from an older firstkit: export it again)")
    ox = backends.get("onnx")
    if ox is not None:
        for key in ("prefill", "decode"):
            if ox.get(key, {}).get("file") not in files:
                raise BundleError(f"{where}: backends.onnx.{key}.file is not listed under files")


def executorch_methods(n_layers: int) -> list[str]:
    """The executable methods of a bundle's ``model.pte`` (docs/bundle_format.md), in call order."""
    return ["embed", "route", *(f"prefill_{i}" for i in range(n_layers)), *(f"layer_{i}" for i in range(n_layers)),
            "head"]


def manifest_sha256(bundle: str | os.PathLike) -> str:
    """sha256 of ``manifest.json`` (the bundle's identity in run results)."""
    return sha256_file(Path(bundle) / MANIFEST)
