"""Where the benches keep their figures: bench/results/<kind>-<UTC time>.json."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write(kind: str, result: dict) -> Path:
    """``result`` as bench/results/<kind>-<UTC time>.json; the path written."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{kind}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    return out
