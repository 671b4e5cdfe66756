"""Shared by the benchmark scripts: write a run's text report and JSON side by side."""
from __future__ import annotations

import json
import os
from typing import Any


def write_bench_outputs(out_dir: str, stem_name: str, lines: list[str], results: dict[str, Any],
                        suffix: str = ".txt") -> None:
    """<out_dir>/<stem_name><suffix> (the text report; ".md" for a Markdown one) and
    <out_dir>/<stem_name>.json."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, stem_name)
    with open(stem + suffix, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {stem}{suffix} and {stem}.json")
