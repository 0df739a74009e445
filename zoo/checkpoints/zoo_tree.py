"""The zoo side of checkpoint conversion: canonical layout (see `zoo.checkpoints.hf_spec`) <-> a model's variables.

The mapping is driven by the model's own abstract variables (`jax.eval_shape` of `init`): every leaf is named by its
path, and the path's tail names the canonical tensor. The names come from the shared layers -- `DecoderBlock`
(`attention_norm`, `attention`, `ffn_norm`, `ffn`), `Attention` (`query`, `key`, `value`, `out`, `query_norm`,
`key_norm`), `MultiHeadLatentAttention` (`q_a`, `q_a_norm`, `q_b`, `kv_a`, `kv_a_norm`, `kv_b`), `MLP` (`gate`,
`up`, `down`), `MoEFFN` (`router/kernel`, stacked `gate`/`up`/`down`, `shared_*`, `shared_gate_kernel`) and the
router's `routing_state/.../bias` -- so a model file needs no conversion code. A path component holding an integer
(`layers_3`, `block_3`) gives the layer index; a leaf of a scanned stack of layers (no index, leading `layers` axis)
takes all layers stacked.
"""

import re

import jax
import numpy as np

from zoo.checkpoints.hf_spec import ConversionError

# (parent module name, leaf name) inside a decoder layer -> (group, canonical name).
_LAYER_RULES = {
  ("attention_norm", "scale"): (None, "attn_norm"),
  ("ffn_norm", "scale"): (None, "ffn_norm"),
  ("query", "kernel"): ("attn", "q"),
  ("key", "kernel"): ("attn", "k"),
  ("value", "kernel"): ("attn", "v"),
  ("out", "kernel"): ("attn", "o"),
  ("query", "bias"): ("attn", "q_bias"),
  ("key", "bias"): ("attn", "k_bias"),
  ("value", "bias"): ("attn", "v_bias"),
  ("query_norm", "scale"): ("attn", "q_norm"),
  ("key_norm", "scale"): ("attn", "k_norm"),
  ("q_a", "kernel"): ("attn", "q_a"),
  ("q_a_norm", "scale"): ("attn", "q_a_norm"),
  ("q_b", "kernel"): ("attn", "q_b"),
  ("kv_a", "kernel"): ("attn", "kv_a"),
  ("kv_a_norm", "scale"): ("attn", "kv_a_norm"),
  ("kv_b", "kernel"): ("attn", "kv_b"),
  ("router", "kernel"): ("ffn", "router"),
  ("router", "bias"): ("ffn", "router_bias"),
  ("gate", "kernel"): ("ffn", "gate"),
  ("up", "kernel"): ("ffn", "up"),
  ("down", "kernel"): ("ffn", "down"),
  ("ffn", "gate"): ("ffn", "gate"),
  ("ffn", "up"): ("ffn", "up"),
  ("ffn", "down"): ("ffn", "down"),
  ("ffn", "shared_gate"): ("ffn", "shared_gate"),
  ("ffn", "shared_up"): ("ffn", "shared_up"),
  ("ffn", "shared_down"): ("ffn", "shared_down"),
  ("ffn", "shared_gate_kernel"): ("ffn", "shared_expert_gate"),
}
# Leaf name outside the layers -> canonical name (the embedding table, the final norm, an untied output head).
_TOP_RULES = {"embedding": "embed", "scale": "final_norm", "kernel": "lm_head"}
_NORM_NAMES = {"attn_norm", "ffn_norm", "q_norm", "k_norm", "q_a_norm", "kv_a_norm", "final_norm"}


def _key_name(entry):
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _layer_index(names):
  """(position in the path, layer index) of the first component holding an integer, or (None, None)."""
  for pos, name in enumerate(names):
    m = re.fullmatch(r"(?:[A-Za-z]+_)?(\d+)", name)
    if m:
      return pos, int(m.group(1))
  return None, None


def classify(path):
  """A variables path (tuple of names, collection first) -> (layer index | 'stacked' | None, group, canonical name).

  Raises ConversionError for a leaf no rule names.
  """
  names = tuple(path)
  pos, index = _layer_index(names[1:])
  inner = names[1:][pos + 1 :] if pos is not None else names[1:]
  if len(inner) >= 2 and (inner[-2], inner[-1]) in _LAYER_RULES:
    group, name = _LAYER_RULES[(inner[-2], inner[-1])]
    return (index if pos is not None else "stacked"), group, name
  if pos is None and names[-1] in _TOP_RULES:
    return None, None, _TOP_RULES[names[-1]]
  raise ConversionError(
    f"model variable {'/'.join(names)} has no Hugging Face counterpart (known layer leaves: "
    f"{sorted('/'.join(k) for k in _LAYER_RULES)})"
  )


def _paths(tree):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [tuple(_key_name(k) for k in path) for path, _ in leaves], [leaf for _, leaf in leaves], treedef


def _canonical_get(canon, index, group, name, num_layers):
  def one(i):
    layer = canon["layers"][i]
    source = layer if group is None else layer[group]
    if name not in source:
      raise KeyError(name)
    return source[name]

  if index == "stacked":
    return np.stack([one(i) for i in range(num_layers)])
  if index is None:
    return canon[name]
  return one(index)


def canonical_to_variables(canon, abstract):
  """Fill the model's abstract variables (`{collection: tree}` of ShapeDtypeStructs) from the canonical layout.

  Every model leaf must have a canonical tensor of its shape (norm scales may differ only by a reshape, e.g. a
  full-projection qk-norm of [heads * head_dim] held as [heads, head_dim]); every canonical tensor must be used.

  Returns:
    numpy variables of the abstract tree's structure and dtypes.
  Raises:
    ConversionError naming the variable and the expected vs found shape, or the canonical tensors left over.
  """
  paths, leaves, treedef = _paths(abstract)
  num_layers = len(canon["layers"])
  used, values = set(), []
  for path, leaf in zip(paths, leaves):
    index, group, name = classify(path)
    label = "/".join(path)
    try:
      value = np.asarray(_canonical_get(canon, index, group, name, num_layers))
    except (KeyError, IndexError):
      raise ConversionError(
        f"model variable {label} {tuple(leaf.shape)} has no tensor in the checkpoint "
        f"(looked for {name!r} of layer {index}); the model config does not match the "
        "checkpoint"
      ) from None
    if value.shape != tuple(leaf.shape):
      if name in _NORM_NAMES and value.size == int(np.prod(leaf.shape)):
        value = value.reshape(leaf.shape)
      else:
        raise ConversionError(
          f"model variable {label}: expected shape {tuple(leaf.shape)}, checkpoint tensor "
          f"{name!r} (layer {index}) has shape {value.shape}"
        )
    used.add((index, group, name))
    values.append(value.astype(leaf.dtype))
  available = {(None, None, k) for k in canon if k != "layers"}
  for i, layer in enumerate(canon["layers"]):
    for key, item in layer.items():
      available |= {(i, key, n) for n in item} if isinstance(item, dict) else {(i, None, key)}
  expanded = set()
  for index, group, name in used:
    expanded |= {(i, group, name) for i in range(num_layers)} if index == "stacked" else {(index, group, name)}
  left = sorted(available - expanded, key=str)
  if left:
    names = ", ".join(f"layer {i} {g or ''}.{n}" for i, g, n in left[:8])
    raise ConversionError(
      f"checkpoint tensors unused by the model ({len(left)}): {names}; the model config does not match the checkpoint"
    )
  return jax.tree_util.tree_unflatten(treedef, values)


def variables_to_canonical(variables, num_layers):
  """The inverse of `canonical_to_variables`: numpy canonical layout from a model's variables."""
  paths, leaves, _ = _paths(variables)
  canon = {"layers": [{"attn": {}, "ffn": {}} for _ in range(num_layers)]}
  for path, leaf in zip(paths, leaves):
    index, group, name = classify(path)
    value = np.asarray(jax.device_get(leaf))
    targets = [(i, value[i]) for i in range(num_layers)] if index == "stacked" else [(index, value)]
    for i, v in targets:
      if i is None:
        canon[name] = v
      elif group is None:
        canon["layers"][i][name] = v
      else:
        canon["layers"][i][group][name] = v
  return canon
