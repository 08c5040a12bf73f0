"""Shared fixtures: every test runs offline, on CPU, with deterministic torch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and oversubscribed threads are very slow on a
# busy 2-core machine; subprocesses launched by tests inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No --help text cached in the user's ~/.cache by the suite (test_cli's cache tests use their own).
os.environ["ICL_CONML_HELP_CACHE"] = "0"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaModel  # noqa: E402

from icl_conml import ICLConfig, ICLModel  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread in-process too (OMP_NUM_THREADS may have been set by the caller)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def load_script():
    """Import a repository script (``benchmarks/…``, ``data_scripts/…``) by its path from the root."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent

    def load(relative_path: str):
        path = root / relative_path
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def tiny_config() -> ICLConfig:
    return ICLConfig(n_dims=5, n_positions=12, n_embd=32, n_layer=2, n_head=2)


@pytest.fixture
def tiny_model(tiny_config: ICLConfig) -> ICLModel:
    torch.manual_seed(0)
    return ICLModel(tiny_config).eval()


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> Path:
    """A tiny randomly initialised Llama saved to disk: a local pretrained backbone (no Hub)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8,
        max_position_embeddings=64,
    )
    LlamaModel(config).save_pretrained(path)
    return path


TINY_TRAIN_ARGS = [
    "--n_dims", "5", "--n_points", "11", "--n_embd", "32", "--n_layer", "2", "--n_head", "2",
    "--per_device_train_batch_size", "16", "--learning_rate", "0.001", "--warmup_steps", "5",
    "--logging_steps", "1", "--save_steps", "1000", "--eval_n_prompts", "0",
    "--report_to", "none", "--disable_tqdm", "true",
]  # fmt: skip
