"""One module per architecture. Look models up by name with `zoo.models.registry`.

Model contract (call signatures by task: CONTRIBUTING.md):
- Model `foo` is the Linen module registered with `@register_model("foo")` in `zoo/models/foo.py` (model name =
  module name); `get_model_class` / `build_model` import only the module asked for.
- Its config keys are exactly its dataclass fields.
- Per-token outputs (routing decisions per token, recursion depths, ...) go through one mechanism: the model sows them
  at its top level into the Flax collection 'intermediates' (`zoo.models.output.sow_output`) and declares their names
  in the class attribute `exposes: ClassVar[tuple[str, ...]]` (empty when it has none). Get them with
  `(logits, out), state = model.apply(variables, inputs, mutable=['intermediates'])`; `state['intermediates'][name]`
  IS the array (not Flax's default 1-tuple). Without 'intermediates' in `mutable`, nothing is sown or computed.
  Names in use:
  - 'expert_ids': int32 [moe_layers, batch, length, k], the experts of each token's k routing slots in each MoE layer
    (-1 = empty slot); every model that routes tokens to experts (moe_lm, smoe_dropout, rmoe, smallthinker,
    blockffn with k = num_experts, readme_moe with k = 1).
  - 'depth': int32 [batch, length], the recursions each token ran (mor).
  - 'routes': int32 [batch, length, num_layers], each token's route per layer, 0 skip / 1 small / 2 big (duo_llm).
  - 'cluster_ids': int32 [batch], the tower (cluster, or domain) each example used (adaptdhm).
"""

import fnmatch

from zoo.models.output import ModelOutput
from zoo.models.registry import ConfigError, build_model, get_model_class, model_names, register_model

__all__ = [
  "ConfigError",
  "ModelOutput",
  "build_model",
  "create_model",
  "get_model_class",
  "list_models",
  "model_names",
  "register_model",
]


def list_models(pattern="*"):
  """The model names matching the shell-style `pattern` (timm's `list_models`), sorted; no model module is imported.

  >>> list_models("moe*")
  ['moe_lm']
  """
  return fnmatch.filter(model_names(), pattern)


def create_model(name, **overrides):
  """The Linen module of model `name` with its defaults changed by `overrides` (timm's `create_model`), e.g.
  `create_model("simplenet", num_classes=100)`; initialise it with `model.init(rng, **inputs)`.

  Raises:
    ConfigError: no model `name` (the message lists them), or an override that is not one of its keys or has an
      invalid value (the message names it and what is allowed).
  """
  return build_model({"name": name}, **overrides)
