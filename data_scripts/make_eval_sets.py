"""Write fixed evaluation prompt sets as ``datasets.Dataset``, each with a dataset card, so that
models compare on identical prompts.

    python data_scripts/make_eval_sets.py --tasks linear_regression sparse_linear_regression \
        --n_dims 20 --n_points 41 --n_prompts 1280 --seed 0 --output_dir eval_sets \
        [--ood orthant] [--sparsity 3 | --task_kwargs '{"depth": 3}'] [--push_to_hub USER/icl-eval-sets]

Each set is one folder ``OUTPUT_DIR/<task>_d<d>_n<n>_s<seed>[_<ood>]`` (``save_to_disk``) with a
``README.md`` dataset card (task, hyper-parameters, d, points, prompts, seed, how it was made,
the command). Task hyper-parameters left out default as in a training recipe, else to the
function class's own defaults. With ``--push_to_hub REPO`` each set becomes the ``test`` split
of config ``<name>`` of that dataset repo, with a section in the repo's card (needs network and
a token). Evaluate on one with ``python -m icl_conml.evaluation --eval_set FOLDER`` or
``--eval_set REPO:CONFIG`` (offline: from the HF cache), or set ``eval_set:`` in a recipe.
The prompts are exactly those ``--seed`` draws in the evaluation CLI. The code is
``icl_conml/eval_sets.py``.
"""

from __future__ import annotations

import sys

from icl_conml.eval_sets import build_card, build_eval_set, main, set_name

__all__ = ["build_card", "build_eval_set", "main", "set_name"]

if __name__ == "__main__":
    sys.exit(main())
