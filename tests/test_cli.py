"""One command line (``icl_conml SUBCOMMAND``) and one error convention for every command.

Each subcommand runs its module's ``main`` (``python -m icl_conml.MODULE`` behaves the same);
a user error is one line ``icl_conml: error: ...`` with exit status 2, a non-finite loss exit 3;
``--traceback`` (a bare ``--debug`` for train and eval) shows the stack instead. The training
parser shows the recipe in its usage line, groups its help by section, and lists and checks the
fixed ConML choices.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers.debug_utils import DebugOption

from icl_conml import cli, errors
from icl_conml.arguments import RecipeError
from icl_conml.recipe_parser import build_parser, parse_recipe
from icl_conml.resources import ResourceNotFound
from icl_conml.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--n_embd", "16", "--n_layer", "1", "--n_head", "2", "--n_dims", "3", "--n_points", "6",
        "--per_device_train_batch_size", "8", "--report_to", "none", "--disable_tqdm", "true",
        "--eval_strategy", "no", "--logging_steps", "1"]  # fmt: skip


@pytest.fixture(autouse=True)
def module_names_after_each_test():
    """The console script switches usage lines to its own spelling: undo it for the next test."""
    yield
    errors._names["cli"] = False


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("icl_conml: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_overview_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: icl_conml COMMAND [ARGS ...] [--traceback]")
    for name in ("train", "eval", "compare", "card", "push", "merge", "make-eval-sets", "experiment",
                 "convert-garg", "recipes"):  # fmt: skip
        assert f"\n  {name} " in out, name
    assert cli.main([]) == 2  # no command: the overview, and a usage status


def test_unknown_subcommand_is_one_line_with_a_suggestion(capsys):
    assert cli.main(["evall", "--model", "x"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(
        "icl_conml: error: unknown command 'evall' (did you mean 'eval'?); choose one of: train"
    )


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_every_subcommand_is_its_module_with_the_cli_name_in_its_usage(name, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([name, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: icl_conml {name}"), out[:300]
    assert "--traceback" in out  # every command takes it


# A user error of every subcommand: (arguments, what the one line says). Each is found before
# any model is built or any file written.
USER_ERRORS = [
    (["train", "--conml_terms", "inn"], "conml_terms='inn' is not allowed (did you mean 'in'?); choose one of"),
    (["eval", "--model", "{tmp}/none", "--output_dir", "{tmp}/ev"], "cannot load model '{tmp}/none'"),
    (["compare", "--models", "a", "b", "--against", "c", "--output_dir", "{tmp}/c"], "compare pairs models by seed"),
    (["card", "{tmp}/none"], "{tmp}/none holds no config.json"),
    (["push", "{tmp}/none", "--hub_model_id", "me/x"], "{tmp}/none holds no config.json"),
    (["merge", "{tmp}/none", "{tmp}/merged"], "{tmp}/none holds no adapter_config.json"),
    (["make-eval-sets", "--tasks", "nope", "--output_dir", "{tmp}/sets"], "unknown task 'nope'"),
    (["experiment", "{tmp}/none.yaml"], "experiment spec '{tmp}/none.yaml' not found"),
    (["convert-garg", "{tmp}/state.pt", "{tmp}/config.yaml", "{tmp}/out"], "cannot read {tmp}/config.yaml"),
    (["recipes", "path", "nope"], "recipe 'nope' not found"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "says"), USER_ERRORS, ids=[case[0][0] for case in USER_ERRORS])
def test_a_user_error_of_every_subcommand_is_one_line_and_exit_2(args, says, tmp_path, capsys):
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    assert cli.main(args) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("icl_conml: error: ") and says.replace("{tmp}", str(tmp_path)) in line, line


def test_usage_errors_of_argparse_commands_are_one_line(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["merge", "only_one_argument"])
    assert exited.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("icl_conml: error: the following arguments are required: output_dir")


def test_traceback_shows_the_stack_instead(capsys):
    with pytest.raises(ResourceNotFound):
        cli.main(["recipes", "path", "nope", "--traceback"])
    with pytest.raises(ResourceNotFound):
        cli.main(["--traceback", "recipes", "path", "nope"])  # before the command too
    with pytest.raises(RecipeError, match="conml_loss='x' is not allowed"):
        train_main(["--conml_loss", "x", "--debug"])  # the old name, kept for train and eval


def test_debug_with_a_value_is_training_arguments_debug():
    argv, show = errors.split_traceback_flag(["--debug", "underflow_overflow", "--max_steps", "3"], True)
    assert not show and argv[:2] == ["--debug", "underflow_overflow"]
    assert parse_recipe(argv).training.debug == [DebugOption.UNDERFLOW_OVERFLOW]
    assert errors.split_traceback_flag(["--max_steps", "3", "--debug"], True) == (["--max_steps", "3"], True)
    assert (
        errors.split_traceback_flag(["--debug", "--max_steps", "3"], False)[1] is False
    )  # not an alias here


def test_a_non_finite_loss_is_one_line_and_exit_3(tmp_path, capsys):
    # lr=1e39 is a finite number but inf in float32: the first update poisons the weights.
    args = [
        "train",
        *TINY,
        "--max_steps",
        "3",
        "--learning_rate",
        "1e39",
        "--output_dir",
        str(tmp_path / "run"),
    ]
    assert cli.main(args) == 3
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("icl_conml: error: ") and "non-finite" in line, line


def test_real_processes_of_both_spellings_give_the_same_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    lines = []
    for command in (["-m", "icl_conml.cli", "merge"], ["-m", "icl_conml.lora", "merge"]):
        done = subprocess.run([sys.executable, *command, str(tmp_path / "none"), str(tmp_path / "out")],
                              cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 2 and done.stdout == ""
        lines.append(_one_error_line(done.stderr))
    assert lines[0] == lines[1]


# ---- the training parser --------------------------------------------------------------------------------
def test_training_help_shows_the_recipe_groups_and_choices():
    text = build_parser().format_help()
    assert text.startswith("usage: python -m icl_conml.train [RECIPE] [--key value ...] [--traceback]")
    sections = [line for line in text.splitlines() if line and not line.startswith(" ")]
    assert [line for line in sections if line.endswith(":")][-5:] == [  # the project's own keys first
        "task:",
        "model:",
        "ConML:",
        "training (the keys the quickstart sets; every transformers.TrainingArguments key below works too):",
        "other transformers.TrainingArguments options (defaults: transformers'):",
    ]
    quickstart = text.split("training (the keys the quickstart sets")[1].split("other transformers")[0]
    assert (
        "--max_steps" in quickstart and "--learning_rate" in quickstart and "--adam_beta1" not in quickstart
    )
    for choices in ("{difference,infonce}", "{both,in,out}",
                    "{probe_mask,extra_sequence}", "{eager,sdpa,flash_attention_2,flash_attention_3}"):  # fmt: skip
        assert choices in text, choices
    words = " ".join(text.split())  # the help is wrapped
    assert "prefix_half | random_subset | shuffle | shuffled_subset" in words  # registered views, by name
    assert "probe_output | probe_hidden" in words  # registered representations


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("conml_loss", "InfoNCE", "difference, infonce"),
        ("conml_prefix_mode", "mask", "probe_mask, extra_sequence"),
        ("attn_implementation", "flash", "eager, sdpa, flash_attention_2, flash_attention_3"),
    ],
)
def test_literal_choices_are_checked_from_yaml_and_command_line(key, value, allowed, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"{key}: {value}\n")
    for argv in ([str(recipe)], [f"--{key}", value]):
        with pytest.raises(
            RecipeError, match=f"^{key}='{value}' is not allowed.*; choose one of: {allowed}$"
        ):
            parse_recipe(argv)
    good = allowed.split(", ")[1]
    parsed = parse_recipe([f"--{key}", good])
    assert getattr(parsed.conml if key.startswith("conml") else parsed.model, key) == good


# ---- help: fast, and every option explained ------------------------------------------------------------------
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["card", "--help"], ["push", "--help"]])
def test_the_console_scripts_help_imports_no_torch(args):
    """``icl_conml --help`` (and card/push help) must not pay for importing torch (3.6 s quiet,
    30 s under load). The process is the console script: its argv[0] is named icl_conml."""
    code = (
        "import sys\n"
        f"sys.argv = ['/venv/bin/icl_conml', *{args!r}]\n"
        "from icl_conml.cli import main\n"
        "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as stop:\n    code = stop.code\n"
        "print('torch imported:', 'torch' in sys.modules, 'exit:', code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "torch imported: False exit: 0", done.stderr[-2000:]


def _help_call(
    command: list[str], tmp_path: Path, *, block_torch: bool, **env: str
) -> subprocess.CompletedProcess:
    """``command`` run with the help cache under ``tmp_path``; with ``block_torch``, importing torch
    fails loudly (a ``torch`` package that raises shadows the real one)."""
    blocker = tmp_path / "no_torch"
    (blocker / "torch").mkdir(parents=True, exist_ok=True)
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "COLUMNS": "100"}
    environment.update({"ICL_CONML_HELP_CACHE": "1", **env})
    if block_torch:
        environment["PYTHONPATH"] = os.pathsep.join([str(blocker), environment.get("PYTHONPATH", "")])
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "icl_conml.train", "--help"],
        [sys.executable, "-m", "icl_conml.evaluation", "compare", "-h"],
        [str(Path(sys.executable).with_name("icl_conml")), "eval", "--help"],
    ],
    ids=["python -m train", "python -m evaluation compare", "icl_conml eval"],
)
def test_a_bare_help_is_printed_again_without_importing_torch(command, tmp_path):
    """The first ``--help`` renders the text (torch and all) and keeps it; the next prints the same
    text with torch unimportable. Another terminal width is another text: rendered anew."""
    if not Path(command[0]).exists():
        pytest.skip("the icl_conml console script is not installed next to this Python")
    first = _help_call(command, tmp_path, block_torch=False)
    assert first.returncode == 0 and "usage:" in first.stdout, first.stderr[-2000:]
    again = _help_call(command, tmp_path, block_torch=True)
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr[-2000:]
    wider = _help_call(command, tmp_path, block_torch=True, COLUMNS="160")
    assert wider.returncode != 0 and "torch was imported" in wider.stderr  # not served stale


def test_help_with_a_recipe_or_a_value_is_never_cached(tmp_path):
    """The text of ``train RECIPE --help`` depends on the recipe's content: always rendered. And
    ``ICL_CONML_HELP_CACHE=0`` turns the cache off."""
    recipe = REPO / "recipes" / "quickstart.yaml"
    command = [sys.executable, "-m", "icl_conml.train", str(recipe), "--help"]
    assert _help_call(command, tmp_path, block_torch=False).returncode == 0
    bare = [sys.executable, "-m", "icl_conml.train", "--help"]
    assert _help_call(bare, tmp_path, block_torch=False, ICL_CONML_HELP_CACHE="0").returncode == 0
    assert not (tmp_path / "cache").exists()


def test_every_subcommand_word_may_precede_a_cached_help(capsys):
    from icl_conml.help_cache import SUBCOMMAND_WORDS

    words = {*cli.SUBCOMMANDS, *(word for command in cli.SUBCOMMANDS.values() for word in command.prefix)}
    with pytest.raises(SystemExit):
        cli.main(["recipes", "--help"])
    recipes_words = capsys.readouterr().out.split("{", 1)[1].split("}", 1)[0].split(",")  # {list,path,copy}
    assert words | set(recipes_words) <= SUBCOMMAND_WORDS, (words | set(recipes_words)) - SUBCOMMAND_WORDS


def test_the_package_digest_changes_with_any_file(tmp_path):
    from icl_conml.help_cache import package_digest

    (tmp_path / "module.py").write_text("x = 1\n")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "a.yaml").write_text("n_dims: 5\n")
    before = package_digest(tmp_path)
    (tmp_path / "recipes" / "a.yaml").write_text("n_dims: 6\n")
    assert package_digest(tmp_path) != before


def test_import_icl_conml_still_registers_the_auto_classes():
    code = "import icl_conml, transformers; print(transformers.AutoConfig.for_model('icl_conml').__class__.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "ICLConfig", done.stderr[-2000:]


def _options_without_help(text: str) -> list[str]:
    """Arguments of an argparse help whose entry has no text (an entry line with nothing after it,
    and no indented continuation line)."""
    lines = text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        entry = line.strip().split("  ")
        if line.startswith("  ") and not line.startswith("   ") and len(entry) == 1:
            following = lines[i + 1] if i + 1 < len(lines) else ""
            if not following.startswith(" " * 8):
                missing.append(entry[0])
    return missing


@pytest.mark.parametrize("name", ["card", "push", "make-eval-sets"])
def test_every_option_of_card_push_and_make_eval_sets_has_help(name, capsys):
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    text = capsys.readouterr().out
    assert "--" in text and not _options_without_help(text), _options_without_help(text)


def test_eval_device_help_says_one_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    words = " ".join(capsys.readouterr().out.split())
    # The same text on every machine (it is cached: help_cache); auto is resolved after parsing.
    assert "auto (cuda when a GPU is visible, else cpu), cpu, cuda, cuda:1, ... (default: auto)" in words
    assert "(default: cpu)" not in words


def test_eval_device_auto_is_resolved_when_parsed():
    import torch

    from icl_conml.evaluation import build_parser
    from icl_conml.evaluation.cli import parse_args

    _, args, _ = parse_args(build_parser(), ["--model", "m", "--output_dir", "o"])
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    _, args, _ = parse_args(build_parser(), ["--model", "m", "--output_dir", "o", "--device", "cpu"])
    assert args.device == "cpu"
