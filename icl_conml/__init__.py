"""icl_conml: meta-train transformers to learn in context, faster with ConML."""

from .modeling import ICLConfig, ICLModel, ICLOutput  # registers the Auto classes
from .version import __version__

__all__ = ["ICLConfig", "ICLModel", "ICLOutput", "ConMLTrainer", "__version__"]


def __getattr__(name: str):
    # The trainer pulls in transformers.Trainer (and deepspeed when installed): load it lazily.
    if name == "ConMLTrainer":
        from .trainer import ConMLTrainer

        return ConMLTrainer
    raise AttributeError(f"module 'icl_conml' has no attribute {name!r}")
