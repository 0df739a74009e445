"""Router registry: `@register_router("name")` on a router factory; `get_router(name)` looks it up.

A router factory builds an unbound Linen router module (e.g. a configured `zoo.routing.Router`) from the options a
model has for its routers. The names are the values of the models' `router` config key ('softmax_topk',
'sigmoid_topk', 'expert_choice', 'random', ...), so a new router is one registered factory and needs no edit in the
models that accept a router by name.

Factory signature (keyword arguments; a factory that does not use an option ignores it unless it contradicts it):
`factory(*, num_experts, num_experts_per_tok, renormalize=True, n_group=1, topk_group=1, routed_scaling_factor=1.0,
jitter_eps=0.0, per_sequence_balance=False, bias=False, bias_update_rate=0.0, **module_kwargs) -> Linen module`
whose `__call__(x [..., embed], *, deterministic)` returns a `zoo.routing.Routing` over the flattened tokens;
`module_kwargs` (`parent`, `name`) go to the module.
"""

from zoo.registry import Registry


class _RouterRegistry(Registry):
  """The routers: registered by zoo.routing's own modules (no package to import from); an unknown name is a
  ValueError."""

  def _raise_unknown(self, name):
    raise ValueError(f"router {name!r} is unknown; choose one of {list(router_names())}")


ROUTERS = _RouterRegistry("router")


def register_router(name):
  """Decorator registering a router factory (a function or a module class) under `name`.

  Args:
    name: the router's name, as written in configs.

  Returns:
    The decorator; it returns the factory unchanged (with `registry_name` set).
  """
  return ROUTERS.register(name)


def router_names():
  """The registered router names, sorted."""
  return tuple(ROUTERS.names())


def get_router(name):
  """The router factory registered under `name`.

  Raises:
    ValueError: `name` is not registered; the message names it and the valid names.
  """
  return ROUTERS.get(name)
