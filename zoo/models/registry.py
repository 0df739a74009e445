"""Model registry: `@register_model("name")` on a Linen module class; `build_model(config.model)` builds it.

A model's config keys are exactly its dataclass fields (besides `name`), so an unknown key fails at start-up with the
list of valid keys. A model's name IS the name of its module: model `foo` is the class registered with
`@register_model("foo")` in `zoo/models/foo.py`. Models are imported lazily, one module at a time: `get_model_class`
imports `zoo.models.<name>` only when that model is asked for, and `model_names` lists the model modules without
importing them. So a new architecture is one model file plus one config and needs no edit elsewhere, and a model
whose optional dependency is missing breaks only its own lookup (a `ConfigError` naming the model and the missing
module), never the others.
"""
import dataclasses
import importlib
import pkgutil

PACKAGE = "zoo.models"
# Modules of the package that hold no model: the registry itself and the shared output record.
SUPPORT_MODULES = ("output", "registry")

_MODELS = {}


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the key and the allowed values."""


def register_model(name):
  """Decorator registering a Linen module class as model `name`.

  A class defined in a module of `zoo.models` must register under its module's name (`get_model_class` imports the
  module of that name); a class defined elsewhere may use any name, but is found only once its module is imported.

  Raises:
    ValueError: the name is taken by another class, or differs from the `zoo.models` module defining the class.
  """
  def wrap(cls):
    module = cls.__module__
    if module.startswith(PACKAGE + ".") and module != f"{PACKAGE}.{name}":
      raise ValueError(f"model class {cls.__qualname__} in {module} registers as {name!r}, but a model's name must be "
                       f"its module's name ({module.rsplit('.', 1)[1]!r}): rename the module to {name}.py or register "
                       f"it as {module.rsplit('.', 1)[1]!r}")
    if name in _MODELS and _MODELS[name] is not cls:
      raise ValueError(f"model name {name!r} is registered twice ({_MODELS[name]} and {cls})")
    _MODELS[name] = cls
    cls.registry_name = name
    return cls
  return wrap


def _model_modules():
  """Names of the model modules of the package, found without importing them."""
  import zoo.models as pkg
  return {info.name for info in pkgutil.iter_modules(pkg.__path__)
          if info.name not in SUPPORT_MODULES and not info.name.startswith("_")}


def model_names():
  """The known model names, sorted: every model module of `zoo.models` (none is imported) and any model registered
  from elsewhere."""
  return sorted(_model_modules() | set(_MODELS))


def get_model_class(name):
  """The model class registered as `name`, importing `zoo.models.<name>` on first use.

  Raises:
    ConfigError: `name` is no model; its module cannot be imported (the message names the model and the missing
      dependency); or its module registers no model of that name.
  """
  if isinstance(name, str) and name in _MODELS:
    return _MODELS[name]
  if not isinstance(name, str) or name not in _model_modules():
    raise ConfigError(f"config.model.name={name!r} is not a known model; choose one of {model_names()}")
  module = f"{PACKAGE}.{name}"
  try:
    importlib.import_module(module)
  except ImportError as e:
    missing = f"module {e.name!r}" if e.name else "a dependency"
    raise ConfigError(f"config.model.name={name!r}: model {name!r} cannot be imported, {missing} is missing ({e}); "
                      "install it to use this model (the other models are not affected)") from e
  if name not in _MODELS:
    raise ConfigError(f"config.model.name={name!r}: module {module} registers no model named {name!r}; a model "
                      f"registers under its module's name with @register_model({name!r})")
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
