"""Compare two run directories field by field: every number of summary.json (timings, environment and the run
folder's own settings aside) and every .npy array, e.g. a run of configs/toy.yaml before and after a refactoring.

    python benchmarks/compare_runs.py runs/before runs/after

Prints each difference (a float with its relative size, a field only one side has, a differing array) and a last
line with the count; exits 1 when a number or an array differs, 0 when only fields were added or removed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

SKIPPED = ("/timings", "/environment", "/config/run")  # how long it took, where it ran, where it was written


def differences(old: Any, new: Any, path: str = "") -> list[tuple[str, str]]:
    """(kind, text) for every difference between two JSON values: kind is "value" or "field"."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            if f"{path}/{key}" in SKIPPED:
                continue
            if key not in old or key not in new:
                out.append(("field", f"{path}/{key} only in the {'new' if key in new else 'old'} run"))
            else:
                out += differences(old[key], new[key], f"{path}/{key}")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(old, float) and isinstance(new, float) and old != new:
        rel = abs(old - new) / max(abs(old), abs(new), 1e-300)
        return [("value", f"{path}: {old!r} vs {new!r} (relative {rel:.1e})")]
    return [] if old == new else [("value", f"{path}: {old!r} vs {new!r}")]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    old, new = (Path(a) for a in argv)
    found = differences(*(json.loads((run / "summary.json").read_text()) for run in (old, new)))
    arrays = sorted({p.relative_to(old) for p in old.rglob("*.npy")} | {p.relative_to(new) for p in new.rglob("*.npy")})
    for rel in arrays:
        if not (old / rel).is_file() or not (new / rel).is_file():
            found.append(("field", f"{rel} only in the {'new' if (new / rel).is_file() else 'old'} run"))
        elif not np.array_equal(np.load(old / rel), np.load(new / rel), equal_nan=True):
            found.append(("value", f"{rel} differs"))
    for _, text in found:
        print(text)
    changed = sum(kind == "value" for kind, _ in found)
    print(f"{changed} numbers or arrays differ, {len(found) - changed} fields only on one side ({len(arrays)} arrays)")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
