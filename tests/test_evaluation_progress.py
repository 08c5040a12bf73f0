"""The evaluation CLI shows tqdm progress on a terminal, and nothing when piped or with --quiet."""

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from icl_conml.evaluation import main

FAST = [
    "--n_prompts",
    "40",
    "--batch_size",
    "16",
    "--bootstrap_samples",
    "10",
    "--baselines",
    "least_squares",
]


@pytest.fixture
def model_dir(tiny_model, tmp_path) -> Path:
    path = tmp_path / "model"
    tiny_model.save_pretrained(path)
    return path


class TerminalStderr(io.StringIO):
    """A stderr that says it is a terminal, as tqdm checks."""

    def isatty(self) -> bool:
        return True


def _stderr_of(monkeypatch, stream: io.StringIO, argv: list[str]) -> str:
    monkeypatch.setattr(sys, "stderr", stream)
    assert main(argv) == 0
    return stream.getvalue()


def test_bars_on_a_terminal_only_and_not_with_quiet(model_dir, tmp_path, monkeypatch):
    argv = ["--model", str(model_dir), *FAST]
    shown = _stderr_of(monkeypatch, TerminalStderr(), [*argv, "--output_dir", str(tmp_path / "a")])
    assert "model forwards" in shown and "least_squares" in shown and "3/3" in shown  # 40 prompts / 16
    assert "40/40" in shown  # the estimator's bar counts prompts
    quiet = _stderr_of(monkeypatch, TerminalStderr(), [*argv, "--output_dir", str(tmp_path / "b"), "--quiet"])
    assert "model forwards" not in quiet and "%|" not in quiet
    piped = _stderr_of(monkeypatch, io.StringIO(), [*argv, "--output_dir", str(tmp_path / "c")])
    assert "model forwards" not in piped and "%|" not in piped


def test_bars_reach_a_real_pseudo_terminal(model_dir, tmp_path):
    """End to end: the CLI as a user runs it, its stderr a pseudo-terminal."""
    leader, follower = pty.openpty()
    # A terminal of 24 rows x 120 columns (a fresh pty has width 0, where tqdm draws nothing).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    command = [sys.executable, "-m", "icl_conml.evaluation", "--model", str(model_dir), *FAST]
    process = subprocess.Popen(
        [*command, "--output_dir", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=follower,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    stdout, _ = process.communicate(timeout=120)
    os.close(leader)
    terminal = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 0, terminal
    assert "model forwards: 100%" in terminal and "least_squares: 100%" in terminal
    assert "%|" not in stdout.decode()  # the results table on stdout stays clean
