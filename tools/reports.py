"""Writing a benchmark's JSON results."""

from __future__ import annotations

import json
import os


def write_json(path: str, data: dict) -> None:
    """`data` as indented JSON at `path`, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
