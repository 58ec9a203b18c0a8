"""Mask specs, the one Python owner (docs/CONTRACTS.md "Mask specs"; C++: ``firstkit::parse_mask_spec``, Java:
``MaskFormat.parseSpec``).

A mask spec is what a user types: ``auto`` (the routers decide), ``all`` (every layer runs) or ``BITS``, one
``0``/``1`` per decoder layer, layer 0 first, ``1`` = the layer runs. It becomes an override vector for the
routing rule (:func:`firstkit.router.routing_rule`): ``-1`` = the routers decide, ``0`` = skip, ``1`` = run.
Protected layers (``never_skip``) always run: a mask that skips one is refused here, before any work.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MASK_SPEC_HELP", "is_mask_spec", "parse_mask_spec", "check_protected"]

MASK_SPEC_HELP = "auto, all or a string of 0/1 (one per layer)"


def is_mask_spec(spec: str) -> bool:
    """``spec`` is ``auto``, ``all`` or a non-empty string of 0/1 (its length is checked against a model later)."""
    return spec in ("auto", "all") or (bool(spec) and not set(spec) - {"0", "1"})


def check_protected(bits: Sequence[int], protected: Sequence[int], spec: str | None = None) -> None:
    """Refuse a 0/1 mask that skips a protected layer (negative indices count from the end)."""
    n = len(bits)
    for p in protected:
        i = p % n if n else p
        if bits[i] == 0:
            shown = f"mask {spec} " if spec else "mask "
            raise ValueError(f"{shown}skips protected layer {i} (protected: {sorted({q % n for q in protected})})")


def parse_mask_spec(spec: str | Sequence[int] | Sequence[bool] | None, n_layers: int,
                    protected: Sequence[int] = ()) -> list[int]:
    """Mask spec -> override vector of ``n_layers`` entries (-1 = routers decide, 0 = skip, 1 = run).

    ``None``/``"auto"``: the routers decide; ``"all"``: every layer runs; a ``"0101"`` string or a sequence of
    0/1 (or bools): exactly that mask, which must keep the ``protected`` layers running.
    """
    if spec is None or (isinstance(spec, str) and spec == "auto"):
        return [-1] * n_layers
    if isinstance(spec, str) and spec == "all":
        return [1] * n_layers
    if isinstance(spec, str):
        if not is_mask_spec(spec):
            raise ValueError(f"mask must be {MASK_SPEC_HELP}, got {spec!r}")
        bits = [int(c) for c in spec]
    else:
        bits = [int(b) for b in spec]
        if any(b not in (0, 1) for b in bits):
            raise ValueError("mask entries must be 0 or 1")
    if len(bits) != n_layers:
        raise ValueError(f"mask has {len(bits)} entries, the model has {n_layers} layers")
    check_protected(bits, protected)
    return bits
