"""icl_conml: meta-train transformers to learn in context, faster with ConML."""

__version__ = "0.1.0"

from .modeling import ICLConfig, ICLModel, ICLOutput  # noqa: E402  (registers the Auto classes)

__all__ = ["ICLConfig", "ICLModel", "ICLOutput", "ConMLTrainer", "__version__"]


def __getattr__(name: str):
    # The trainer pulls in transformers.Trainer (and deepspeed when installed): load it lazily.
    if name == "ConMLTrainer":
        from .trainer import ConMLTrainer

        return ConMLTrainer
    raise AttributeError(f"module 'icl_conml' has no attribute {name!r}")
