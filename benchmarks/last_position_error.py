"""How the error at the last context length of the training prompts compares with the one before.

The study evaluates at k = 2d, which with n_points = 2d + 1 is the last position a training prompt
has. This reads every experiment record under the given folders (``final_curve.mean``, the error
by k at the end of the run) and prints, per folder, how often the error at the last k is above the
one before, and the median ratios err[last] / err[last - 1] and err[last - 1] / err[last - 2]. Runs
whose error at last - 1 is above ``--max_error`` (still on the loss plateau) are left out.

    python benchmarks/last_position_error.py docs/study/lr_cpu docs/study/slr_8k_cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def curves(folder: Path) -> list[list[float]]:
    """The final error curves of the experiment records under ``folder`` (JSON data, nothing run)."""
    found = []
    for path in sorted(folder.rglob("*.json")):
        if path.is_symlink():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        final = record.get("final_curve") if isinstance(record, dict) else None
        mean = final.get("mean") if isinstance(final, dict) else None
        if isinstance(mean, list) and len(mean) >= 3 and all(isinstance(v, (int, float)) for v in mean):
            found.append([float(v) for v in mean])
    return found


def last_position_summary(found: list[list[float]], max_error: float) -> dict[str, float] | None:
    """Runs kept, runs with err[last] > err[last-1], and the two median ratios; None if no run is kept."""
    kept = [c for c in found if 0 < c[-2] <= max_error and c[-3] > 0]
    if not kept:
        return None
    return {
        "runs": len(kept),
        "last_above": sum(c[-1] > c[-2] for c in kept),
        "last_ratio": statistics.median(c[-1] / c[-2] for c in kept),
        "before_ratio": statistics.median(c[-2] / c[-3] for c in kept),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--max_error", type=float, default=0.3, help="leave out runs above this at last - 1")
    args = parser.parse_args()
    print(
        "| records | runs | err[last] > err[last-1] | median err[last]/err[last-1] | median err[last-1]/err[last-2] |"
    )
    print("|---|---|---|---|---|")
    for folder in args.folders:
        summary = last_position_summary(curves(folder), args.max_error)
        if summary is None:
            print(f"| {folder} | 0 | n/a | n/a | n/a |")
            continue
        print(
            f"| {folder} | {summary['runs']} | {summary['last_above']} | {summary['last_ratio']:.3f} "
            f"| {summary['before_ratio']:.3f} |"
        )


if __name__ == "__main__":
    main()
