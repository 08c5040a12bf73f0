"""The model card of a saved run folder, rendered from a template with ``huggingface_hub``.

Every folder the Trainer saves (each checkpoint, the final model), every merged LoRA export
and every push gets a ``README.md``: ``ModelCard.from_template(ModelCardData(...), TEMPLATE)``.
The YAML header holds the Hub metadata (``library_name``, tags, ``base_model``) and, when an
evaluation's ``results.json`` sits in the folder, its numbers as machine-readable
``eval_results`` (the Hub's ``model-index``): error at k = d and k = 2d and the needed
context length of the model, on the function class and dimension it was evaluated on. The body
says what the model is and how to load it, the ConML settings, a training summary from the log
history, the evaluation's own table (``results.md``, written by ``evaluation.report``) and plot,
and the full recipe.

Everything comes from the folder's own files (``config.json``, ``recipe.yaml``,
``trainer_state.json``, ``results.*``, ``adapter_config.json``); the Trainer passes its live
log history instead (``trainer.ConMLTrainer.write_run_files``). Pushing is ``hub.py``'s job.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .modeling import ICLConfig
from .version import __version__

RECIPE_NAME = "recipe.yaml"
STATE_NAME = "trainer_state.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: What an evaluation writes (``python -m icl_conml.evaluation``); copied next to the card.
EVALUATION_FILES = ("results.json", "results.md", "curves.png")
#: The last training log's values in the training summary: (log key, what it is, with its unit).
TRAIN_ROWS = (
    ("loss", "training loss (squared error, not normalised; with ConML: + λ · ConML term)"),
    ("icl_error", "training error (squared error / the task's normaliser, mean over k)"),
)
#: The last evaluation's values in the training summary (normalised errors, as the evaluation's).
EVAL_ROWS = (
    ("eval_error_at_d", "eval error at k = d"),
    ("eval_error_at_2d", "eval error at k = 2d"),
    ("eval_needed_context_length", "needed context length k (eval error ≤ 0.1)"),
)
#: The card's default license: icl_conml's own (a publisher may change it in the header).
LICENSE = "apache-2.0"
#: The ``model-index`` task of every icl_conml model (the Hub shows it as the evaluation's task).
TASK_TYPE, TASK_NAME = "in-context-learning", "In-context regression"

#: The card's body (Jinja2; ``ModelCard.from_template`` renders it). ``card_data`` is the YAML header.
TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

An in-context learner for **{{ task }}** (inputs of dimension d = {{ n_dims }}, up to {{ n_positions }} \
(x, y) pairs per prompt), meta-trained with icl_conml {{ version }} and {{ objective }}: it reads a prompt \
(x₁, y₁, …, x_k, y_k, x_query) and predicts y_query from the examples alone.

## Model

| field | value |
|---|---|
{% for field, value in model_rows %}| {{ field }} | {{ value }} |
{% endfor %}
## Usage

Needs `pip install icl_conml`{% if adapter %} with its `peft` extra (`pip install 'icl_conml[peft]'`){% endif %}.

```python
import torch
{% if adapter -%}
from icl_conml.data import Prompts
from icl_conml.lora import load_lora_model

model = load_lora_model("{{ repo }}")  # the pretrained backbone + these adapters
# icl_conml.lora.merge("{{ repo }}", "merged/") exports a plain ICLModel (no peft needed)
{%- else -%}
from transformers import AutoModel

import icl_conml  # registers the model with the Auto classes
from icl_conml.data import Prompts

model = AutoModel.from_pretrained("{{ repo }}")  # or icl_conml.ICLModel.from_pretrained
{%- endif %}

# 4 prompts of the model's function class, n = {{ n_positions }} (x, y) pairs each
task = model.task_class
prompts = Prompts.sample(task, n_prompts=4, n_points=model.config.n_positions, seed=0)
xs, ys = prompts.xs, prompts.ys  # xs (4, n, d), ys (4, n)
with torch.no_grad():
    predictions = model(xs=xs, ys=ys).predictions  # column k predicts ys[:, k] from the k pairs before it
print(task.error(predictions, ys).mean(0))  # normalised error at each k (1 = predicting 0)
```
{% if conml_rows %}
## ConML

| setting | value |
|---|---|
{% for setting, value in conml_rows %}| {{ setting }} | {{ value }} |
{% endfor %}{% endif %}{% if summary_rows %}
## Training summary

| metric | value |
|---|---|
{% for metric, value in summary_rows %}| {{ metric }} | {{ value }} |
{% endfor %}{% endif %}{% if evaluation_table or eval_rows or plot %}
## Evaluation

{% if evaluation_table %}{{ evaluation_table }}
{% elif eval_rows %}On {{ eval_dataset }} (the model-index above; the full curves are in results.json):

| metric | value |
|---|---|
{% for metric, value in eval_rows %}| {{ metric }} | {{ value }} |
{% endfor %}{% endif %}{% if plot %}
![error against the number of in-context examples]({{ plot }})
{% endif %}{% endif %}
## Limitations

- The model predicts in context for **{{ task }}** prompts like those it was trained on: inputs of \
dimension {{ n_dims }} (a smaller d is zero-padded) drawn from the training distribution, at most \
{{ n_positions }} pairs. Longer prompts are refused; other input distributions, scales or function \
classes are out of distribution (measure them with `icl_conml eval --ood ...`).
- It is a research model trained on synthetic data, not a language model: it reads numbers, not text.
- The numbers on this card come from finite random prompt sets (see each table for how many); \
`icl_conml eval` gives bootstrap intervals.
{% if pretrained %}- It builds on the pretrained backbone `{{ pretrained }}`, whose own license and limitations apply.
{% endif %}
## License

{{ license_name }}{% if pretrained %}; the backbone `{{ pretrained }}` keeps its own license{% endif %}. \
(The license of trained weights is their publisher's choice: edit `license:` in the header to change it.)

## Citation

The ConML objective and the in-context learning setting:

```bibtex
@inproceedings{wu2025conml,
  title     = {Learning to Learn with Contrastive Meta-Objective},
  author    = {Wu, Shiguang and Wang, Yaqing and Bian, Yatao and Yao, Quanming},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2025},
  eprint    = {2410.05975},
  archivePrefix = {arXiv}
}

@inproceedings{garg2022what,
  title     = {What Can Transformers Learn In-Context? A Case Study of Simple Function Classes},
  author    = {Garg, Shivam and Tsipras, Dimitris and Liang, Percy and Valiant, Gregory},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2022},
  eprint    = {2208.01066},
  archivePrefix = {arXiv}
}
```
{% if recipe %}
## Recipe

Reproduce with `python -m icl_conml.train {{ recipe_name }}`:

```yaml
{{ recipe }}
```
{% endif %}"""


def _fmt(value: Any) -> str:
    """A value in one of the card's tables (4 significant digits for floats)."""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _rows(pairs: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    return [(str(key), _fmt(value)) for key, value in pairs]


def duration(seconds: float) -> str:
    """A run time in words: ``1 h 2 min``, ``30 min 29 s``, ``12 s``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def training_summary(log_history: list[dict[str, Any]], eval_prompts: str = "") -> list[tuple[str, Any]]:
    """(metric, value) pairs a reader can interpret: the last training log's losses (raw squared
    error, and normalised as the evaluation reports it), the last evaluation's errors at k = d and
    2d and needed context length (on ``eval_prompts``, e.g. "256 fixed prompts"), and the run's
    length and time. Optimiser internals (learning rate, gradient norm, the ConML distances) are in
    ``trainer_state.json``, not here."""
    rows: list[tuple[str, Any]] = []
    train_logs = [entry for entry in log_history if "loss" in entry]
    eval_logs = [entry for entry in log_history if "eval_loss" in entry]
    steps = max((entry.get("step", 0) for entry in log_history), default=0)
    if steps:
        rows.append(("optimizer steps", steps))
    if train_logs:
        last = train_logs[-1]
        at = f"step {last.get('step')}"
        for key, label in TRAIN_ROWS:
            if key in last:
                rows.append((f"{label} ({at})", last[key]))
    if eval_logs:
        last = eval_logs[-1]
        at = f"step {last.get('step')}" + (f", {eval_prompts}" if eval_prompts else "")
        for key, label in EVAL_ROWS:
            if key in last:
                value = last[key]
                if key == "eval_needed_context_length" and value == -1:
                    value = "not reached within the prompt"
                rows.append((f"{label} ({at})", value))
    for entry in log_history:
        if "train_runtime" in entry:
            rows.append(("training time", duration(float(entry["train_runtime"]))))
    return rows


def _eval_prompts(recipe: dict[str, Any]) -> str:
    """What the training-time evaluation ran on, from the run's recipe ("" when unknown)."""
    if recipe.get("eval_set"):
        return f"eval set {recipe['eval_set']}"
    count = recipe.get("eval_n_prompts")
    return f"{count} fixed prompts, seed {recipe.get('eval_seed', 0)}" if count else ""


def eval_results(results: dict[str, Any]) -> list[EvalResult]:
    """The model's numbers of an evaluation (a ``results.json`` dict) as ``model-index`` entries.

    The dataset is the function class at the evaluated dimension (``type`` = the class,
    ``config`` = the distribution shift or ``in-distribution``); the metrics are the error at
    k = d and k = 2d (when the prompts are that long) and the needed context length at the
    evaluation's threshold (left out when the model never reaches it within the prompt).
    A ``results.json`` without the evaluation's metadata or a ``model`` curve gives none.
    """
    meta = results.get("metadata") or {}
    curve = (results.get("curves") or {}).get("model")
    if not curve or "task" not in meta or "n_dims" not in meta:
        return []
    task, n_dims, ood = meta["task"], int(meta["n_dims"]), meta.get("ood")
    common = {
        "task_type": TASK_TYPE,
        "task_name": TASK_NAME,
        "dataset_type": task,
        "dataset_name": f"{task}, d={n_dims}" + (f", {ood}" if ood else ""),
        "dataset_config": ood or "in-distribution",
        "dataset_split": "test",
        "dataset_args": {
            key: meta[key]
            for key in ("n_dims", "n_points", "n_prompts", "seed", "eval_set")
            if meta.get(key) is not None
        },
    }
    entries = [
        EvalResult(
            **common,
            metric_type="error_at_k",
            metric_name=f"error at k={k} ({label})",
            metric_value=float(curve[k]),
            metric_args={"k": k},
        )
        for k, label in ((n_dims, "d"), (2 * n_dims, "2d"))
        if k < len(curve) and curve[k] is not None
    ]
    threshold = (results.get("thresholds") or {}).get("absolute")
    needed = ((results.get("needed_context_length") or {}).get("absolute") or {}).get("model")
    if threshold is not None and needed is not None:
        entries.append(
            EvalResult(
                **common,
                metric_type="needed_context_length",
                metric_name=f"needed context length (error ≤ {threshold:g})",
                metric_value=int(needed),
                metric_args={"threshold": threshold},
            )
        )
    return entries


def build_model_card(
    folder: str | Path,
    *,
    log_history: list[dict[str, Any]] | None = None,
    conml_settings: dict[str, Any] | None = None,
    repo_id: str | None = None,
    template: str = TEMPLATE,
) -> ModelCard:
    """The model card of a saved model folder, from the folder's own files.

    ``log_history`` and ``conml_settings`` default to what ``trainer_state.json`` and
    ``recipe.yaml`` in the folder say (the Trainer passes its live values); ``template`` is a
    Jinja2 template like ``TEMPLATE`` (the variables are those ``TEMPLATE`` uses).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: not a saved icl_conml model folder")
    config = ICLConfig.from_pretrained(folder)
    adapter = (folder / ADAPTER_CONFIG_NAME).is_file()
    recipe_text = (folder / RECIPE_NAME).read_text() if (folder / RECIPE_NAME).is_file() else ""
    recipe = (yaml.safe_load(recipe_text) or {}) if recipe_text else {}
    if log_history is None and (folder / STATE_NAME).is_file():
        log_history = json.loads((folder / STATE_NAME).read_text()).get("log_history", [])
    if conml_settings is None:
        conml_settings = {key: value for key, value in recipe.items() if key.startswith("conml_")}
    conml_lambda = float(conml_settings.get("conml_lambda", 0) or 0)
    results = json.loads((folder / "results.json").read_text()) if (folder / "results.json").is_file() else {}
    evaluation = eval_results(results)

    pretrained = config.backbone_name_or_path
    on_hub = bool(pretrained) and not os.path.exists(pretrained)
    name = repo_id.split("/")[-1] if repo_id else folder.resolve().name
    tags = ["icl_conml", "in-context-learning", "meta-learning", config.task]
    tags += ["conml"] if conml_lambda > 0 else []
    tags += ["lora"] if adapter else []
    data = ModelCardData(
        model_name=name if evaluation else None,  # the model-index needs the model's name
        library_name="peft" if adapter else "transformers",
        tags=tags,
        base_model=pretrained if on_hub else None,
        license=LICENSE,
        eval_results=evaluation or None,
    )
    backbone_desc = f"pretrained `{pretrained}`" if pretrained else "GPT-2 trained from scratch"
    model_rows = [
        ("task", config.task),
        ("task arguments", json.dumps(config.task_kwargs) if config.task_kwargs else "-"),
        ("n_dims", config.n_dims),
        ("n_positions (pairs)", config.n_positions),
        ("backbone", f"{config.backbone_config.model_type} ({backbone_desc})"),
        ("hidden size / layers / heads", f"{config.n_embd} / {config.n_layer} / {config.n_head}"),
        (
            "weights",
            "LoRA adapters + read-in/read-out (safetensors)" if adapter else "full model (safetensors)",
        ),
    ]
    results_md = folder / "results.md"
    return ModelCard.from_template(
        data,
        template_str=template,
        name=name,
        task=config.task,
        n_dims=config.n_dims,
        n_positions=config.n_positions,
        version=__version__,
        objective=f"ConML (λ = {conml_lambda:g})" if conml_lambda > 0 else "plain ICL (no ConML)",
        model_rows=_rows(model_rows),
        adapter=adapter,
        repo=repo_id or "PATH_OR_HUB_ID",
        conml_rows=_rows(sorted(conml_settings.items())),
        summary_rows=_rows(training_summary(log_history or [], _eval_prompts(recipe))),
        # The evaluation's own table (evaluation.report.results_table wrote it), else the model-index.
        evaluation_table=results_md.read_text().strip() if results_md.is_file() else "",
        eval_rows=_rows([(entry.metric_name, entry.metric_value) for entry in evaluation]),
        eval_dataset=evaluation[0].dataset_name if evaluation else "",
        plot="curves.png" if (folder / "curves.png").is_file() else "",
        recipe=recipe_text.rstrip(),
        pretrained=pretrained or "",
        license_name="Apache-2.0" if LICENSE == "apache-2.0" else LICENSE,
        recipe_name=RECIPE_NAME,
    )


def write_model_card(
    folder: str | Path, *, evaluation_dir: str | Path | None = None, **card_kwargs: Any
) -> Path:
    """Write ``folder/README.md``; ``evaluation_dir``'s results and plot are copied in first."""
    folder = Path(folder)
    if evaluation_dir is not None:
        evaluation_dir = Path(evaluation_dir)
        if not (evaluation_dir / "results.json").is_file():
            raise FileNotFoundError(f"{evaluation_dir} holds no results.json: run the evaluation first")
        for name in EVALUATION_FILES:
            if (evaluation_dir / name).is_file() and evaluation_dir.resolve() != folder.resolve():
                shutil.copy(evaluation_dir / name, folder / name)
    path = folder / "README.md"
    build_model_card(folder, **card_kwargs).save(path)
    return path
