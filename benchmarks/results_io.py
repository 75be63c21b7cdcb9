"""What every benchmark records beside its numbers, and how it writes them.

The scripts run as ``python benchmarks/NAME.py``, so this module imports as ``results_io``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

#: An innermost JSON array of numbers (or nulls) spread over several indented lines.
_NUMBERS = re.compile(r"\[\s+((?:-?[\d.eE+-]+|null)(?:,\s+(?:-?[\d.eE+-]+|null))*)\s+\]")


def machine(**extra: Any) -> dict[str, Any]:
    """The machine and moment of a run: date, cores, platform, Python, load average."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        **extra,
    }


def write_json(path: str | Path, result: Any) -> Path:
    """Write ``result`` as indented JSON with each innermost list of numbers on one line (long
    traces stay readable), creating the directory; prints and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, default=str)
    text = _NUMBERS.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    path.write_text(text + "\n")
    print(f"wrote {path}")
    return path
