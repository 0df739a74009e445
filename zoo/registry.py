"""Named plug-ins (tasks, evaluators): one module per plug-in in a package, imported when a config names it.

`Registry("task", "zoo.tasks", "config.task")`: `@registry.register("lm")` on a class; `registry.get("lm")` imports
`zoo.tasks.lm` the first time, so a plug-in whose optional dependency is missing breaks only itself; `names()` lists
the package's modules (without importing them) and any plug-in registered from elsewhere (a test, a user's module).
"""
import importlib
import pkgutil

from zoo.models.registry import ConfigError


class Registry:
  """Plug-ins of one kind; see the module docstring."""

  def __init__(self, kind, package, config_key):
    self.kind, self.package, self.config_key = kind, package, config_key
    self._classes = {}

  def register(self, name):
    def wrap(cls):
      if name in self._classes and self._classes[name] is not cls:
        raise ValueError(f"{self.kind} name {name!r} is registered twice ({self._classes[name]} and {cls})")
      self._classes[name] = cls
      cls.registry_name = name
      return cls
    return wrap

  def names(self):
    package = importlib.import_module(self.package)
    shipped = {m.name for m in pkgutil.iter_modules(package.__path__) if m.name != "base"}
    return sorted(shipped | set(self._classes))

  def get(self, name):
    """The class registered as `name`, importing `<package>.<name>` when needed.

    Raises:
      ConfigError: an unknown name, or a module whose import fails (naming the missing dependency).
    """
    if name not in self._classes:
      if name not in self.names():
        raise ConfigError(f"{self.config_key}={name!r} is not a known {self.kind}; choose one of {self.names()}")
      try:
        importlib.import_module(f"{self.package}.{name}")
      except ImportError as e:
        raise ConfigError(f"{self.config_key}={name!r}: its module {self.package}.{name} cannot be imported ({e})") \
            from None
      if name not in self._classes:
        raise ConfigError(f"{self.package}.{name} registers no {self.kind} named {name!r}")
    return self._classes[name]
