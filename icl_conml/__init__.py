"""icl_conml: meta-train transformers to learn in context, faster with ConML.

``import icl_conml`` registers ``ICLConfig``/``ICLModel`` with the Auto classes (it imports
``icl_conml.modeling``, hence torch). The ``icl_conml`` console script is the exception: its
``--help``, ``--version`` and usage errors need no model, so in that process the package imports
nothing heavy up front and each subcommand's module imports what it uses (``modeling`` among
them, which registers the Auto classes all the same); the names below then load on first use.
A bare ``--help`` of any command prints its cached text before torch is imported
(``help_cache``).
"""

import os
import sys

from .version import __version__

__all__ = ["ICLConfig", "ICLModel", "ICLOutput", "ConMLTrainer", "__version__"]

#: The console scripts (``[project.scripts]``) whose start-up stays light.
CONSOLE_SCRIPTS = ("icl_conml", "icl_conml.exe")

if sys.argv[:1] == ["-m"]:  # `python -m icl_conml.MODULE ...` while the package is imported
    from .help_cache import print_cached_help

    if print_cached_help():  # a bare --help printed as last time: no torch to import
        sys.exit(0)

if os.path.basename(sys.argv[0] if sys.argv else "") not in CONSOLE_SCRIPTS:
    from .modeling import ICLConfig, ICLModel, ICLOutput  # registers the Auto classes


def __getattr__(name: str):
    # The trainer pulls in transformers.Trainer (and deepspeed when installed): load it lazily;
    # under the console script the model classes too.
    if name == "ConMLTrainer":
        from .trainer import ConMLTrainer

        return ConMLTrainer
    if name in ("ICLConfig", "ICLModel", "ICLOutput"):
        from . import modeling

        return getattr(modeling, name)
    raise AttributeError(f"module 'icl_conml' has no attribute {name!r}")
