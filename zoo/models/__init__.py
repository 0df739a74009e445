"""One module per architecture. Look models up by name with `zoo.models.registry`."""
from zoo.models.registry import ConfigError, build_model, get_model_class, model_names, register_model
from zoo.models.output import ModelOutput

__all__ = ["ConfigError", "ModelOutput", "build_model", "get_model_class", "model_names", "register_model"]
