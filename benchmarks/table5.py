"""Does ConML help? The paper's Table 5 at CPU scale, with paired seeds.

Phase ``train`` trains, for each task and seed, plain ICL (λ = 0) and ConML variants that share
the seed, hence the same initial weights and the same training prompts (only the ConML probes
and views differ). Phase ``analyze`` evaluates every model on one fixed evaluation set and
compares each ConML variant with plain ICL (Rel. Min. Error, Shot Spare), writing
``docs/results.md`` and plots.

    python benchmarks/table5.py train   [--seeds 0 1 2] [--max_steps 2000] [--only NAME ...]
    python benchmarks/table5.py analyze [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "table5"

# The CPU-scale setting: d = 5, 10 in-context examples before the last query, a small GPT-2.
COMMON = [
    "--n_dims", "5", "--n_points", "11", "--n_embd", "64", "--n_layer", "4", "--n_head", "4",
    "--per_device_train_batch_size", "64", "--learning_rate", "0.001", "--warmup_steps", "200",
    "--lr_scheduler_type", "cosine", "--logging_steps", "50", "--save_steps", "100000",
    "--eval_n_prompts", "0", "--report_to", "none", "--disable_tqdm", "true",
]  # fmt: skip
PAPER = ["--conml_lambda", "0.02"]  # every other ConML key at its default = the paper's ICL setting
VARIANTS: dict[str, list[str]] = {
    "plain": ["--conml_lambda", "0"],
    "conml": PAPER,
    "conml_lambda0.01": ["--conml_lambda", "0.01"],
    "conml_lambda0.05": ["--conml_lambda", "0.05"],
    "conml_lambda0.1": ["--conml_lambda", "0.1"],
    "conml_hidden_shuffled": [
        "--conml_lambda",
        "0.02",
        "--conml_representation",
        "probe_hidden",
        "--conml_views",
        "shuffled_subset",
    ],  # fmt: skip
    # Exploration: M = d = 5 probes make the representation the function's values at 5 points
    # (enough to identify a linear map in d = 5), compared by a softmax over the batch.
    "conml_infonce_5probes": [
        "--conml_lambda",
        "0.02",
        "--conml_num_probes",
        "5",
        "--conml_loss",
        "infonce",
        "--conml_distance",
        "sq_euclidean",
        "--conml_temperature",
        "1.0",
    ],  # fmt: skip
}
TASKS = {"linear_regression": [], "sparse_linear_regression": ["--sparsity", "2"]}
# Which variants run on which task (the λ sweep and the design card's variant on LR only).
PLAN = {
    "linear_regression": list(VARIANTS),
    "sparse_linear_regression": ["plain", "conml"],
}


def run_dir(task: str, variant: str, seed: int) -> Path:
    return RUNS / task / variant / f"seed{seed}"


def train(seeds: list[int], max_steps: int, only: list[str] | None, tasks: list[str]) -> None:
    """Train the missing runs; several workers may share the list (a run is claimed by a marker)."""
    from icl_conml.train import main

    for seed in seeds:
        for task in tasks:
            task_args = TASKS[task]
            for variant in PLAN[task]:
                if only and variant not in only:
                    continue
                out = run_dir(task, variant, seed)
                out.mkdir(parents=True, exist_ok=True)
                try:
                    (out / "claimed").open("x").close()
                except FileExistsError:
                    continue
                start = time.time()
                args = [*COMMON, "--task", task, *task_args, *VARIANTS[variant]]
                args += ["--max_steps", str(max_steps), "--seed", str(seed), "--output_dir", str(out)]
                assert main(args) == 0
                (out / "wall_time.json").write_text(json.dumps({"seconds": time.time() - start}))
                print(f"[table5] {task} {variant} seed {seed}: {time.time() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("phase", choices=["train", "analyze"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=2000)
    parser.add_argument("--only", nargs="*", default=None, help="variants to train (default: all)")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args()
    if args.phase == "train":
        train(args.seeds, args.max_steps, args.only, args.tasks)
    else:
        from table5_analysis import analyze

        analyze(args.seeds)


if __name__ == "__main__":
    main()
