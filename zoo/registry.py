"""Named plug-ins (models, routers, tasks, evaluators), and `ConfigError`, the error of an invalid config value.

`Registry("task", "zoo.tasks", "config.task")`: `@registry.register("lm")` on a class; `registry.get("lm")` imports
`zoo.tasks.lm` the first time, so a plug-in whose optional dependency is missing breaks only itself; `names()` lists
the package's modules (without importing them) and any plug-in registered from elsewhere (a test, a user's module).
Without a package (`Registry("router")`) only what was registered is known. A subclass words its own errors by
overriding `_raise_unknown`, `_raise_import_failed` and `_raise_unregistered`.
"""

import importlib
import pkgutil


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the key and the allowed values."""


class Registry:
  """Plug-ins of one kind; see the module docstring.

  Attributes:
    classes: {name: registered class (or factory)}.
  """

  def __init__(self, kind, package=None, config_key=None, support_modules=("base",)):
    """`support_modules`: the package's modules that hold no plug-in (modules named `_*` never do)."""
    self.kind, self.package, self.config_key, self.support_modules = kind, package, config_key, support_modules
    self.classes = {}

  def register(self, name):
    """Decorator registering a class (or factory) as `name`; it sets `registry_name` and returns it unchanged."""

    def wrap(cls):
      if name in self.classes and self.classes[name] is not cls:
        raise ValueError(f"{self.kind} name {name!r} is registered twice ({self.classes[name]} and {cls})")
      self.classes[name] = cls
      cls.registry_name = name
      return cls

    return wrap

  def modules(self):
    """Names of the package's plug-in modules, found without importing them."""
    if self.package is None:
      return set()
    package = importlib.import_module(self.package)
    return {
      m.name
      for m in pkgutil.iter_modules(package.__path__)
      if m.name not in self.support_modules and not m.name.startswith("_")
    }

  def names(self):
    """The known names, sorted: the package's plug-in modules and whatever was registered."""
    return sorted(self.modules() | set(self.classes))

  def get(self, name):
    """The class registered as `name`, importing `<package>.<name>` when needed.

    Raises:
      ConfigError: an unknown name, or a module whose import fails (naming the missing dependency).
    """
    if isinstance(name, str) and name in self.classes:
      return self.classes[name]
    if not isinstance(name, str) or name not in self.modules():
      self._raise_unknown(name)
    try:
      importlib.import_module(f"{self.package}.{name}")
    except ImportError as e:
      self._raise_import_failed(name, e)
    if name not in self.classes:
      self._raise_unregistered(name)
    return self.classes[name]

  def _raise_unknown(self, name):
    raise ConfigError(f"{self.config_key}={name!r} is not a known {self.kind}; choose one of {self.names()}")

  def _raise_import_failed(self, name, error):
    raise ConfigError(
      f"{self.config_key}={name!r}: its module {self.package}.{name} cannot be imported ({error})"
    ) from None

  def _raise_unregistered(self, name):
    raise ConfigError(f"{self.package}.{name} registers no {self.kind} named {name!r}")
