"""firstkit.device_bench: native runner builds, first-bench over adb or locally, loopback test device."""

from pathlib import Path as _Path

#: JSON schema of the "Run result JSON" (docs/CONTRACTS.md)
SCHEMA_PATH = _Path(__file__).resolve().parent / "schemas" / "run_result.schema.json"
