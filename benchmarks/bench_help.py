"""``--help`` as a user waits for it: rendered (imports torch) against printed from the cache.

Each round runs every command twice, interleaved: once with the cache off
(``ICL_CONML_HELP_CACHE=0``: the text is rendered, as on the first call after an install or an
edit) and once from the cache (warmed before the first round). Wall time of the whole process.

    python benchmarks/bench_help.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "python -m icl_conml.train --help": [sys.executable, "-m", "icl_conml.train", "--help"],
    "icl_conml eval --help": [str(Path(sys.executable).with_name("icl_conml")), "eval", "--help"],
}


def seconds(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache, "COLUMNS": "100", "HF_HUB_OFFLINE": "1"}
        modes = {
            "rendered": {**env, "ICL_CONML_HELP_CACHE": "0"},
            "cached": {**env, "ICL_CONML_HELP_CACHE": "1"},
        }
        for command in COMMANDS.values():
            seconds(command, modes["cached"])  # warm the cache
        times = {(name, mode): [] for name in COMMANDS for mode in modes}
        for _ in range(args.rounds):
            for name, command in COMMANDS.items():
                for mode, mode_env in modes.items():
                    times[name, mode].append(seconds(command, mode_env))
    for name in COMMANDS:
        rendered, cached = (statistics.median(times[name, mode]) for mode in modes)
        spread = {mode: f"[{min(times[name, mode]):.2f}, {max(times[name, mode]):.2f}]" for mode in modes}
        print(
            f"{name:36s} rendered {rendered:.2f} s {spread['rendered']}, cached {cached:.2f} s "
            f"{spread['cached']}: {cached / rendered:.3f}x"
        )


if __name__ == "__main__":
    main()
