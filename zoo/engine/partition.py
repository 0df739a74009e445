"""Which parameters train: the split of the params tree into trainable and frozen parts, before differentiation.

A parameter is frozen when its path ('/'-joined, e.g. 'layers_0/attention/query/kernel') matches one of
`config.frozen_params` (regular expressions, `re.search`), when `config.trainable_params` is non-empty and it matches
none of those, or when the model's optional hook `trainable_params(params) -> pytree of bool` says False. The two
parts are nested dicts holding disjoint paths; the train step differentiates the trainable part only, so frozen
parameters get no gradient buffers and no optimizer state. The model may store its frozen part in another form
(`store_frozen`: QLoRA keeps the frozen base kernels in NF4).
"""

import re

import flax.linen as nn
import jax
from flax import traverse_util

from zoo.models import ConfigError


def path_name(path):
  return "/".join(str(p) for p in path)


def trainable_mask(params, model=None, trainable=(), frozen=()):
  """{path tuple: bool} for every leaf of `params` (boxed or not).

  Raises:
    ConfigError: a pattern that matches no parameter, or a `trainable_params` hook of the wrong structure.
  """
  flat = traverse_util.flatten_dict(nn.unbox(params))
  names = {path: path_name(path) for path in flat}
  for key, patterns in (("trainable_params", trainable), ("frozen_params", frozen)):
    for pattern in patterns:
      if not any(re.search(pattern, name) for name in names.values()):
        example = next(iter(names.values()), "")
        raise ConfigError(
          f"config.{key}: pattern {pattern!r} matches no parameter; parameter paths look like "
          f"{example!r} ({len(names)} parameters)"
        )
  mask = {
    path: (not trainable or any(re.search(p, name) for p in trainable)) and not any(re.search(p, name) for p in frozen)
    for path, name in names.items()
  }
  hook = getattr(model, "trainable_params", None)
  if hook is not None:
    flags = traverse_util.flatten_dict(hook(nn.unbox(params)))
    if set(flags) != set(flat) or not all(isinstance(f, bool) for f in flags.values()):
      raise ValueError(
        f"{type(model).__name__}.trainable_params must return one Python bool per parameter, in the structure of params"
      )
    mask = {path: mask[path] and flags[path] for path in flat}
  return mask


def split(params, mask):
  """(trainable, frozen) nested dicts of the leaves of `params` whose mask is True / False."""
  flat = traverse_util.flatten_dict(params, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
  trainable = {p: v for p, v in flat.items() if mask[p]}
  frozen = {p: v for p, v in flat.items() if not mask[p]}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable, frozen):
  """The params tree with both parts (nested dicts with disjoint paths)."""
  if not frozen:
    return trainable
  if not trainable:
    return frozen
  flat = traverse_util.flatten_dict(trainable, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
  flat.update(traverse_util.flatten_dict(frozen, is_leaf=lambda _, x: isinstance(x, nn.Partitioned)))
  return traverse_util.unflatten_dict(flat)


def store_frozen(model, frozen):
  """The frozen part as the train state keeps it: the model's optional hook `frozen_storage(frozen) -> frozen`
  (e.g. QLoRA's NF4 base kernels, `zoo.layers.lora`), or `frozen` as it is."""
  hook = getattr(model, "frozen_storage", None)
  return hook(frozen) if hook is not None and frozen else frozen


def count(tree):
  return sum(int(x.size) for x in jax.tree.leaves(tree))
