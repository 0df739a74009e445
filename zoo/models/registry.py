"""Model registry: `@register_model("name")` on a Linen module class; `build_model(config.model)` builds it.

A model's config keys are exactly its dataclass fields (besides `name`), so an unknown key fails at start-up with the
list of valid keys. Every module in `zoo/models` is imported on first lookup, so a new architecture is one model file
plus one config and needs no edit elsewhere.
"""
import dataclasses
import importlib
import pkgutil

_MODELS = {}
_IMPORTED = False


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the key and the allowed values."""


def register_model(name):
  def wrap(cls):
    if name in _MODELS and _MODELS[name] is not cls:
      raise ValueError(f"model name {name!r} is registered twice ({_MODELS[name]} and {cls})")
    _MODELS[name] = cls
    cls.registry_name = name
    return cls
  return wrap


def _import_all():
  global _IMPORTED
  if _IMPORTED:
    return
  import zoo.models as pkg
  for info in pkgutil.iter_modules(pkg.__path__):
    if info.name != "registry":
      importlib.import_module(f"zoo.models.{info.name}")
  _IMPORTED = True


def model_names():
  _import_all()
  return sorted(_MODELS)


def get_model_class(name):
  _import_all()
  if name not in _MODELS:
    raise ConfigError(f"config.model.name={name!r} is not a known model; choose one of {model_names()}")
  return _MODELS[name]


def model_fields(cls):
  return {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}


def build_model(model_config, **overrides):
  """Instantiate the model named by `model_config.name` with the remaining keys as its fields."""
  cfg = dict(model_config)
  if "name" not in cfg:
    raise ConfigError("config.model.name is missing; choose one of " + str(model_names()))
  cls = get_model_class(cfg.pop("name"))
  fields = model_fields(cls)
  kwargs = {}
  for key, value in {**cfg, **overrides}.items():
    if key not in fields:
      raise ConfigError(f"config.model.{key} is not a field of model {cls.registry_name!r}; "
                        f"valid keys: {sorted(fields)}")
    if hasattr(value, "to_dict"):
      value = value.to_dict()
    if isinstance(value, list):
      value = tuple(value)
    kwargs[key] = value
  return cls(**kwargs)
