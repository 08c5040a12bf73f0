"""Key roles (``arguments.KeyRole``), declared once per key on the argument dataclasses, decide
what ``recipe.yaml`` records, what a resume refuses to change and what experiment pairing
compares. Pinned here through those three behaviours (not the role table itself): every key
answers as it did before the roles existed (commit 769854f; init_perturbation_std and
resume_allow_changes as at 2fb39fa, which added them), but the keys listed in ``CHANGED``,
where the resume allow-list and the pairing deny-list disagreed and a role was picked.
"""

from __future__ import annotations

import re
import types

import pytest
import yaml

from icl_conml import arguments
from icl_conml.arguments import known_keys
from icl_conml.experiment import ExperimentError
from icl_conml.experiment.analysis import check_pairing
from icl_conml.recipe_parser import parse_recipe
from icl_conml.runs.resume import check_resume

# (recipe.yaml: always / if set / never, a resume refuses a change, pairing compares) before the roles.
# attn_implementation and max_steps show as not compared: pairing takes both from the record's
# top level (equal here), not from its recipe; seed is what pairs differ in.
TODAY = {
    ("if set", False, True): (
        "accelerator_config activation_checkpointing activation_checkpointing_kwargs auto_find_batch_size "
        "average_tokens_across_devices batch_eval_metrics bf16_full_eval dataloader_drop_last "
        "dataloader_in_order dataloader_multiprocessing_context dataloader_num_workers "
        "dataloader_persistent_workers dataloader_pin_memory dataloader_prefetch_factor ddp_backend "
        "ddp_broadcast_buffers ddp_bucket_cap_mb ddp_find_unused_parameters ddp_static_graph ddp_timeout "
        "debug deepspeed do_eval do_predict do_train enable_jit_checkpoint eval_accumulation_steps "
        "eval_delay eval_do_concat_batches eval_on_start eval_use_gather_object fp16_full_eval fsdp "
        "fsdp_config full_determinism gradient_checkpointing gradient_checkpointing_kwargs "
        "greater_is_better hub_always_push hub_revision hub_token ignore_data_skip include_for_metrics "
        "include_num_input_tokens_seen label_names label_smoothing_factor length_column_name "
        "liger_kernel_config load_best_model_at_end local_rank log_level log_level_replica "
        "log_on_each_node logging_first_step logging_nan_inf_filter metric_for_best_model "
        "neftune_noise_alpha num_train_epochs optim_target_modules parallelism_config "
        "prediction_loss_only project remove_unused_columns restore_callback_states_from_checkpoint "
        "save_on_each_node save_only_model skip_memory_metrics tf32 torch_compile torch_compile_backend "
        "torch_compile_mode torch_empty_cache_steps trackio_bucket_id trackio_space_id "
        "trackio_static_space_id train_sampling_strategy use_cache use_cpu use_liger_kernel"
    ),
    ("always", True, True): (
        "activation_function adam_beta1 adam_beta2 adam_epsilon backbone_name_or_path bf16 conml_distance conml_lambda "
        "conml_lambda_start conml_lambda_warmup conml_loss conml_num_probes conml_num_views "
        "conml_prefix_mode conml_representation conml_subset_max conml_subset_min conml_temperature "
        "conml_terms conml_views curriculum_dims_inc curriculum_dims_interval curriculum_dims_start "
        "curriculum_points_inc curriculum_points_interval curriculum_points_start data_seed dropout fp16 "
        "freeze_backbone gradient_accumulation_steps init_perturbation_std learning_rate lora_alpha lora_dropout lora_r "
        "lora_target_modules lr_scheduler_kwargs lr_scheduler_type max_grad_norm n_dims n_embd n_head "
        "n_layer n_points n_positions optim optim_args per_device_train_batch_size task task_kwargs "
        "task_pool_size warmup_steps weight_decay"
    ),
    ("always", True, False): ("attn_implementation depth hidden_size noise_std seed sparsity"),
    ("if set", False, False): (
        "disable_tqdm hub_model_id hub_private_repo hub_strategy logging_strategy push_to_hub run_name "
        "save_strategy"
    ),
    ("always", False, True): (
        "eval_n_prompts eval_seed eval_set eval_steps eval_strategy per_device_eval_batch_size"
    ),
    ("always", False, False): ("logging_steps max_steps output_dir report_to save_steps save_total_limit"),
    ("never", False, False): ("overwrite_output_dir resume_from_checkpoint"),
    ("never", False, True): ("resume_allow_changes resume_extend_schedule resume_weights_only"),
}
# Where today's two rules disagreed (resume: allowed; pairing: compared) and the role picked:
CHANGED = {
    # experiment: they change what is trained or which model a run ends with (noise on the
    # embeddings, a halved batch, TF32 matmuls, deterministic kernels, data not skipped on resume,
    # the best checkpoint instead of the last)
    **dict.fromkeys(
        ("auto_find_batch_size", "full_determinism", "greater_is_better", "ignore_data_skip",
         "load_best_model_at_end", "metric_for_best_model", "neftune_noise_alpha", "optim_target_modules",
         "tf32"),
        ("always", True, True),
    ),
    # bookkeeping: what is logged, shown, saved or pushed, not what is trained or measured
    **dict.fromkeys(
        ("hub_always_push", "hub_revision", "include_num_input_tokens_seen", "log_level", "log_level_replica",
         "log_on_each_node", "logging_first_step", "logging_nan_inf_filter", "project", "save_on_each_node",
         "save_only_model", "skip_memory_metrics", "trackio_bucket_id", "trackio_space_id",
         "trackio_static_space_id"),
        ("if set", False, False),
    ),
    # run control: this invocation only (a resume option; a credential, never written anywhere)
    **dict.fromkeys(
        ("hub_token", "restore_callback_states_from_checkpoint", "resume_allow_changes", "resume_extend_schedule",
         "resume_weights_only"),
        ("never", False, False),
    ),
}  # fmt: skip


def _answers(tmp_path) -> dict[str, tuple[str, bool, bool]]:
    """Every key's (recipe.yaml, resume refuses, pairing compares), from the three behaviours."""
    keys = sorted(set(known_keys()))
    recipe = parse_recipe(["--output_dir", str(tmp_path)])
    always = set(recipe.to_dict())
    recipe.raw = dict.fromkeys(keys, "new")
    written = set(recipe.to_dict())
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / "recipe.yaml").write_text(
        yaml.safe_dump({**dict.fromkeys(written, -7.5), "global_batch_size": 1})
    )
    with pytest.raises(arguments.RecipeError) as refusal:
        check_resume(recipe, str(checkpoint), 1, 2)
    refused = set(re.findall(r"(\w+) -7\.5 -> ", str(refusal.value)))
    assert "global_batch_size 1 -> 2" in str(refusal.value)  # the global batch a run implies
    spec = types.SimpleNamespace(arms={"a": {}, "b": {}})
    answers = {}
    for key in keys:
        records = {
            (arm, 0): {
                "recipe": {"task": "linear_regression", key: value},
                "max_steps": 1,
                "attn_implementation": "sdpa",
            }
            for arm, value in (("a", "one"), ("b", "two"))
        }
        try:
            check_pairing(spec, records)
            compared = False
        except ExperimentError:
            compared = True
        recorded = "always" if key in always else "if set" if key in written else "never"
        answers[key] = (recorded, key in refused, compared)
    return answers


def test_every_key_answers_as_before_but_the_picked_ones(tmp_path):
    expected = {key: answer for answer, keys in TODAY.items() for key in keys.split()}
    expected.update(CHANGED)
    got = _answers(tmp_path)
    assert set(got) == set(expected), "a new or removed key: give it a role (arguments.KeyRole) and pin it"
    assert {key: got[key] for key in got if got[key] != expected[key]} == {}


def test_declared_roles_name_fields_of_their_dataclass():
    for section in arguments.SECTIONS:
        fields = set(section.__dataclass_fields__)
        assert set(getattr(section, "_key_roles", {})) <= fields, section.__name__
    assert arguments.key_role("global_batch_size") is arguments.EXPERIMENT
    assert arguments.key_role("no_such_key") is None


def test_reusing_a_record_compares_what_pairing_compares(tmp_path):
    """``run_settings`` (is a record, or ``compare``'s model folder, the same run?) reads the same
    roles as pairing: they disagree only where pairing takes a key from the record's top level
    (attn_implementation, max_steps), on eval_strategy, which a study always sets to "steps", and
    on task_kwargs, which run_settings compares as the task's hyper-parameters (with the class)."""
    from icl_conml.run_settings import setting_differences

    disagree = {
        key
        for key, (_, _, paired) in _answers(tmp_path).items()
        if bool(setting_differences({key: "one"}, {key: "two"}, None)) != paired
    }
    assert disagree == {"attn_implementation", "max_steps", "eval_strategy", "task_kwargs"}


def test_the_resolved_recipe_keeps_command_line_order_whatever_the_hash_seed():
    """recipe.yaml lists keys set only on the command line in the order they were given, so the
    same command writes the same file under any PYTHONHASHSEED (a set once made it vary)."""
    import json
    import os
    import subprocess
    import sys

    flags = ["--disable_tqdm", "true", "--torch_compile", "false", "--logging_nan_inf_filter", "false"]
    flags += ["--dataloader_drop_last", "true", "--eval_on_start", "false", "--skip_memory_metrics", "false"]
    code = (
        "import json, sys; from icl_conml.recipe_parser import parse_recipe; "
        "print(json.dumps(list(parse_recipe(sys.argv[1:]).to_dict())))"
    )
    orders = set()
    for seed in ("0", "1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code, *flags], env=env, capture_output=True, text=True, check=True
        )
        orders.add(tuple(json.loads(out.stdout.strip().splitlines()[-1])))
    assert len(orders) == 1
    given = [flag[2:] for flag in flags[::2]]
    order = next(iter(orders))
    listed = [key for key in order if key in given]
    assert listed == [key for key in given if key in listed]
