"""Model registry: `@register_model("name")` on a Linen module class; `build_model(config.model)` builds it.

A model's config keys are exactly its dataclass fields (besides `name`), so an unknown key fails at start-up with the
list of valid keys; a key a model renamed (its class attribute `renamed_keys`, old -> new) is read as the new key with a
warning naming it. `check_config` holds the field checks every model's `__post_init__` shares. A model's name IS the
name of its module: model `foo` is the class registered with `@register_model("foo")` in `zoo/models/foo.py`. Models are
imported lazily, one module at a time: `get_model_class` imports `zoo.models.<name>` only when that model is asked for,
and `model_names` lists the model modules without importing them. So a new architecture is one model file plus one
config and needs no edit elsewhere, and a model whose optional dependency is missing breaks only its own lookup (a
`ConfigError` naming the model and the missing module), never the others.
"""

import dataclasses
import logging
import re

from zoo.registry import ConfigError, Registry

PACKAGE = "zoo.models"
# Modules of the package that hold no model: the registry itself, the shared output record and the decoder parts.
SUPPORT_MODULES = ("decoder_parts", "output", "registry")


def _is_int(value):
  return isinstance(value, int) and not isinstance(value, bool)


def _in_interval(value, interval):
  """Whether `value` lies in `interval`, written as in mathematics: '[0, 1)', '(0, 1]', '[0, inf)'."""
  match = re.fullmatch(r"([\[(])\s*([^,]+),\s*([^\])]+)([\])])", interval)
  if match is None:
    raise ValueError(f"interval {interval!r} is not of the form '[lo, hi)'")
  left, lo, hi, right = match.group(1), float(match.group(2)), float(match.group(3)), match.group(4)
  above = value >= lo if left == "[" else value > lo
  below = value <= hi if right == "]" else value < hi
  return above and below


def check_config(model, *, positive=(), optional_positive=(), non_negative=(), intervals=None, choices=None, dtypes=()):
  """The field checks models share; the first violated one raises a `ConfigError` naming `config.model.<key>`, its
  value and what is allowed.

  Args:
    model: the module (a dataclass) whose fields are checked.
    positive: keys that must be integers >= 1.
    optional_positive: keys that must be None or integers >= 1.
    non_negative: keys that must be numbers >= 0.
    intervals: {key: '[lo, hi)'} (brackets as in mathematics; 'inf' allowed).
    choices: {key: allowed values}.
    dtypes: keys that must name a dtype ('float32', 'bfloat16', ...).
  """
  for key in positive:
    value = getattr(model, key)
    if not _is_int(value) or value < 1:
      raise ConfigError(f"config.model.{key}={value!r} must be a positive integer")
  for key in optional_positive:
    value = getattr(model, key)
    if value is not None and (not _is_int(value) or value < 1):
      raise ConfigError(f"config.model.{key}={value!r} must be a positive integer or None")
  for key in non_negative:
    value = getattr(model, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise ConfigError(f"config.model.{key}={value!r} must be >= 0")
  for key, interval in (intervals or {}).items():
    value = getattr(model, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _in_interval(value, interval):
      raise ConfigError(f"config.model.{key}={value!r} must be in {interval}")
  for key, allowed in (choices or {}).items():
    if getattr(model, key) not in allowed:
      raise ConfigError(f"config.model.{key}={getattr(model, key)!r} is invalid; choose one of {tuple(allowed)}")
  for key in dtypes:
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel  (the registry itself needs no jax)

    try:
      jnp.dtype(getattr(model, key))
    except TypeError as e:
      raise ConfigError(
        f"config.model.{key}={getattr(model, key)!r} is not a dtype (e.g. 'float32', 'bfloat16')"
      ) from e


class _ModelRegistry(Registry):
  """The models: a model's name is its module's name, and a failed lookup says how to fix it."""

  def register(self, name):
    register = super().register(name)

    def wrap(cls):
      module = cls.__module__
      if module.startswith(PACKAGE + ".") and module != f"{PACKAGE}.{name}":
        raise ValueError(
          f"model class {cls.__qualname__} in {module} registers as {name!r}, but a model's name must be "
          f"its module's name ({module.rsplit('.', 1)[1]!r}): rename the module to {name}.py or register "
          f"it as {module.rsplit('.', 1)[1]!r}"
        )
      return register(cls)

    return wrap

  def _raise_import_failed(self, name, error):
    missing = f"module {error.name!r}" if error.name else "a dependency"
    raise ConfigError(
      f"config.model.name={name!r}: model {name!r} cannot be imported, {missing} is missing ({error}); "
      "install it to use this model (the other models are not affected)"
    ) from error

  def _raise_unregistered(self, name):
    raise ConfigError(
      f"config.model.name={name!r}: module {PACKAGE}.{name} registers no model named {name!r}; a model "
      f"registers under its module's name with @register_model({name!r})"
    )


MODELS = _ModelRegistry("model", PACKAGE, "config.model.name", support_modules=SUPPORT_MODULES)


def register_model(name):
  """Decorator registering a Linen module class as model `name`.

  A class defined in a module of `zoo.models` must register under its module's name (`get_model_class` imports the
  module of that name); a class defined elsewhere may use any name, but is found only once its module is imported.

  Raises:
    ValueError: the name is taken by another class, or differs from the `zoo.models` module defining the class.
  """
  return MODELS.register(name)


def model_names():
  """The known model names, sorted: every model module of `zoo.models` (none is imported) and any model registered
  from elsewhere."""
  return MODELS.names()


def get_model_class(name):
  """The model class registered as `name`, importing `zoo.models.<name>` on first use.

  Raises:
    ConfigError: `name` is no model; its module cannot be imported (the message names the model and the missing
      dependency); or its module registers no model of that name.
  """
  return MODELS.get(name)


def model_fields(cls):
  return {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}


def renamed_keys(cls):
  """{old key: new key} of the config keys model class `cls` renamed (its class attribute `renamed_keys`)."""
  return dict(getattr(cls, "renamed_keys", {}))


def _apply_renames(cls, cfg):
  """`cfg` with every renamed key under its new name (a warning names each); both names at once is an error."""
  out = dict(cfg)
  for old, new in renamed_keys(cls).items():
    if old not in out:
      continue
    if new in out:
      raise ConfigError(
        f"config.model.{old} was renamed to config.model.{new} (model {cls.registry_name!r}); "
        f"set only config.model.{new}"
      )
    logging.warning(
      "config.model.%s is now called config.model.%s (model %r); reading it as %s", old, new, cls.registry_name, new
    )
    out[new] = out.pop(old)
  return out


def build_model(model_config, **overrides):
  """Instantiate the model named by `model_config.name` with the remaining keys as its fields (renamed keys read as
  their new names)."""
  cfg = dict(model_config)
  if "name" not in cfg:
    raise ConfigError("config.model.name is missing; choose one of " + str(model_names()))
  cls = get_model_class(cfg.pop("name"))
  fields = model_fields(cls)
  kwargs = {}
  for key, value in _apply_renames(cls, {**cfg, **overrides}).items():
    if key not in fields:
      raise ConfigError(
        f"config.model.{key} is not a field of model {cls.registry_name!r}; valid keys: {sorted(fields)}"
      )
    if hasattr(value, "to_dict"):
      value = value.to_dict()
    if isinstance(value, list):
      value = tuple(value)
    kwargs[key] = value
  return cls(**kwargs)
