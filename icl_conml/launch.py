"""Start training on every node of a SLURM allocation: one ``accelerate launch`` per node.

``recipes/launch.slurm`` runs ``python -m icl_conml.launch`` once per node (``srun
--ntasks-per-node=1``); each copy reads the allocation from SLURM's environment and replaces
itself with this node's command::

    accelerate launch --config_file CONFIG --num_machines N --machine_rank R \\
        --num_processes N*G --main_process_ip HEAD --main_process_port PORT \\
        -m icl_conml.train RECIPE [--key value ...]

HEAD is the first node of ``SLURM_JOB_NODELIST``; PORT is ``MASTER_PORT`` or derived from
the job id, so every node computes the same address without talking to the others. G is the
GPUs per node (``SLURM_GPUS_ON_NODE``, ``SLURM_GPUS_PER_NODE`` or ``--gpus_per_node``).

``--print`` prints this node's command instead of running it; ``--all_nodes`` prints the
command of every node (one per line), to check an allocation before spending it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_CONFIG = "accelerate_config.yaml"


class LaunchError(ValueError):
    """The allocation or the arguments do not describe a launch: one line, no traceback."""


@dataclass(frozen=True)
class Allocation:
    """What every node must agree on, read from the scheduler."""

    hosts: list[str]
    node_rank: int
    gpus_per_node: int
    port: int

    @property
    def num_machines(self) -> int:
        return len(self.hosts)

    @property
    def main_process_ip(self) -> str:
        return self.hosts[0]


def expand_hostlist(nodelist: str) -> list[str]:
    """SLURM's compressed host list as host names: ``gpu[01-02,07],cpu3`` → gpu01 gpu02 gpu07 cpu3."""
    hosts: list[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        parts = re.split(r"\[([^\]]*)\]", item)  # text, ranges, text, ranges, ...
        choices: list[list[str]] = []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                choices.append([part])
                continue
            values: list[str] = []
            for piece in part.split(","):
                low, _, high = piece.partition("-")
                if not (low.isdigit() and (not high or high.isdigit())):
                    raise LaunchError(
                        f"cannot read the node range [{part}] in SLURM_JOB_NODELIST={nodelist!r}"
                    )
                width = len(low)
                values += [str(n).zfill(width) for n in range(int(low), int(high or low) + 1)]
            choices.append(values)
        hosts += ["".join(combination) for combination in itertools.product(*choices)]
    if not hosts:
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r} names no node")
    return hosts


def _gpus_per_node(env: dict[str, str], override: int | None) -> int:
    if override is not None:
        return override
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "")
        count = value.split("(")[0].split(":")[-1]  # "8", "h100:8" or "8(x2)"
        if count.isdigit():
            return int(count)
    import torch

    if torch.cuda.device_count() == 0:
        raise LaunchError(
            "no GPU count in SLURM's environment and none visible; ask for GPUs (--gpus-per-node) "
            "or pass --gpus_per_node N"
        )
    return torch.cuda.device_count()


def read_allocation(
    env: dict[str, str], gpus_per_node: int | None = None, port: int | None = None
) -> Allocation:
    """The allocation as this node sees it, from SLURM's variables."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError(
            "SLURM_JOB_NODELIST is not set: run inside a SLURM allocation (sbatch recipes/launch.slurm ...)"
        )
    hosts = expand_hostlist(nodelist)
    expected = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if expected and int(expected) != len(hosts):
        raise LaunchError(
            f"SLURM_NNODES={expected} but SLURM_JOB_NODELIST={nodelist!r} holds {len(hosts)} nodes"
        )
    node_rank = int(env.get("SLURM_NODEID", "0"))
    if not 0 <= node_rank < len(hosts):
        raise LaunchError(f"SLURM_NODEID={node_rank} is outside the allocation's {len(hosts)} nodes")
    if port is None:
        # The same on every node of the job, and different for jobs that share a node.
        port = (
            int(env["MASTER_PORT"])
            if env.get("MASTER_PORT")
            else 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        )
    return Allocation(
        hosts=hosts, node_rank=node_rank, gpus_per_node=_gpus_per_node(env, gpus_per_node), port=port
    )


def _uses_deepspeed(config_file: str) -> bool:
    path = Path(config_file)
    if not path.is_file():
        raise LaunchError(
            f"accelerate config {config_file!r} not found; pass one of recipes/accelerate/*.yaml"
        )
    config = yaml.safe_load(path.read_text()) or {}
    return str(config.get("distributed_type", "")).upper() == "DEEPSPEED"


def node_command(
    allocation: Allocation, node_rank: int, config_file: str, train_args: list[str], python: str = "python"
) -> list[str]:
    """The ``accelerate launch`` command of node ``node_rank``."""
    command = [
        python, "-m", "accelerate.commands.launch",
        "--config_file", config_file,
        "--num_machines", str(allocation.num_machines),
        "--machine_rank", str(node_rank),
        "--num_processes", str(allocation.num_machines * allocation.gpus_per_node),
        "--main_process_ip", allocation.main_process_ip,
        "--main_process_port", str(allocation.port),
    ]  # fmt: skip
    if _uses_deepspeed(config_file):
        # Each node starts its own processes (torchrun), instead of DeepSpeed's pdsh/ssh launcher.
        command += ["--deepspeed_multinode_launcher", "standard"]
    return command + ["-m", "icl_conml.train", *train_args]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m icl_conml.launch",
        description="Run `accelerate launch -m icl_conml.train` for this node of a SLURM allocation.",
    )
    parser.add_argument(
        "--config_file", default=DEFAULT_CONFIG, help="Accelerate config (recipes/accelerate/)."
    )
    parser.add_argument(
        "--gpus_per_node", type=int, default=None, help="Override SLURM's GPU count per node."
    )
    parser.add_argument("--main_process_port", type=int, default=None, help="Override the rendezvous port.")
    parser.add_argument("--python", default=sys.executable, help="Interpreter that runs accelerate.")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument(
        "--print", action="store_true", help="Print this node's command instead of running it."
    )
    shown.add_argument("--all_nodes", action="store_true", help="Print every node's command, one per line.")
    parser.add_argument(
        "train_args", nargs=argparse.REMAINDER, help="RECIPE.yaml [--key value ...] for training."
    )
    return parser


def main(argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = dict(os.environ if env is None else env)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    try:
        allocation = read_allocation(env, args.gpus_per_node, args.main_process_port)
        ranks = range(allocation.num_machines) if args.all_nodes else [allocation.node_rank]
        commands = [node_command(allocation, r, args.config_file, train_args, args.python) for r in ranks]
    except LaunchError as error:
        print(f"icl_conml.launch: error: {error}", file=sys.stderr)
        return 2
    if args.print or args.all_nodes:
        print("\n".join(shlex.join(command) for command in commands))
        return 0
    sys.stdout.flush()
    os.execvp(commands[0][0], commands[0])  # this process becomes the node's launcher
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
