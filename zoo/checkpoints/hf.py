"""Load Hugging Face decoder LMs into zoo models, and export zoo MoE models back to Hugging Face format.

Supported families (config.json `model_type`): llama, qwen2, qwen3 -> `dense_lm`; mixtral, olmoe, qwen2_moe,
qwen3_moe, deepseek_v3 -> `moe_lm`. Weights are read from safetensors with numpy (`zoo.checkpoints.safetensors_io`;
never pickle), validated against config.json (`zoo.checkpoints.hf_spec`), and mapped onto the model's own variables
(`zoo.checkpoints.zoo_tree`). Numerics kept for parity: RMSNorm epsilon, RoPE theta and scaling, tied embeddings,
q/k/v biases (Qwen2), per-head (Qwen3) or whole-projection (OLMoE) qk-norm, `norm_topk_prob` / Mixtral's
renormalisation, DeepSeek-V3's sigmoid scores with `e_score_correction_bias`, group-limited top-k,
`routed_scaling_factor`, shared experts and `first_k_dense_replace` / `moe_layer_freq`, Qwen2-MoE's sigmoid-gated
shared expert. Dispatch never drops tokens (`capacity_factor=0`).
"""

import json
import os
import shutil
import uuid
import warnings

import jax
import ml_collections
import numpy as np

from zoo.checkpoints import hf_spec, safetensors_io, zoo_tree
from zoo.checkpoints.hf_spec import ConversionError
from zoo.models.registry import get_model_class, model_fields

EXPORT_FAMILIES = ("mixtral", "qwen3_moe")
ZOO_CONFIG_FILE = "zoo_config.json"


def _moe_pattern(flags):
  """(first_dense_layers, moe_every) reproducing the per-layer MoE flags with the moe_lm rule
  `i >= first and i % every == 0`; ConversionError when no pair does."""
  layers = len(flags)
  for first in range(layers):
    for every in range(1, layers + 1):
      if tuple(i >= first and i % every == 0 for i in range(layers)) == tuple(flags):
        return first, every
  raise ConversionError(
    f"the MoE layers {[i for i, f in enumerate(flags) if f]} of {layers} cannot be expressed by "
    "moe_lm's rule (layer i is MoE iff i >= first_dense_layers and i % moe_every == 0)"
  )


def _model_config(arch):
  """(model name, fields that must be set, fields that may be dropped when the model lacks them)."""
  a = arch
  fields = dict(
    vocab_size=a.vocab_size,
    num_layers=a.num_layers,
    embed_dim=a.embed_dim,
    num_heads=a.num_heads,
    num_kv_heads=a.num_kv_heads,
    head_dim=a.head_dim,
    mlp_dim=a.mlp_dim,
    rope_theta=a.rope_theta,
    norm_epsilon=a.norm_epsilon,
    tie_embeddings=a.tie_embeddings,
    mlp_activation="swiglu",
  )
  optional = dict(
    qk_norm=a.qk_norm is not None, qkv_bias=a.qkv_bias, sliding_window=a.sliding_window, rope_scaling=a.rope_scaling
  )
  if a.qk_norm == "full":
    optional["qk_norm_scope"] = "projection"  # OLMoE: one RMSNorm over all heads of q (and of k)
  if a.family not in hf_spec.MOE_FAMILIES:
    return "dense_lm", fields, optional
  first, every = _moe_pattern(a.moe_layers)
  fields.update(
    moe_every=every,
    first_dense_layers=first,
    num_experts=a.num_experts,
    num_experts_per_tok=a.experts_per_token,
    expert_mlp_dim=a.expert_mlp_dim,
    router="sigmoid_topk" if a.router == "sigmoid" else "softmax_topk",
    renormalize=a.renormalize,
    capacity_factor=0.0,
    n_group=a.n_group,
    topk_group=a.topk_group,
    routed_scaling_factor=a.routed_scaling_factor,
  )
  if a.shared_mlp_dim:
    per = a.expert_mlp_dim if a.family == "deepseek_v3" else a.shared_mlp_dim
    fields.update(
      num_shared_experts=a.shared_mlp_dim // per, shared_expert_mlp_dim=per, shared_expert_gate=a.shared_expert_gate
    )
  optional["router_bias"] = a.router_bias
  if a.mla:  # MLA has no head_dim or kv heads of its own: its widths replace them
    del fields["head_dim"], fields["num_kv_heads"]
    optional.update(
      attention="mla",
      q_lora_rank=a.q_lora_rank,
      kv_lora_rank=a.kv_lora_rank,
      qk_nope_head_dim=a.qk_nope_head_dim,
      qk_rope_head_dim=a.qk_rope_head_dim,
      v_head_dim=a.v_head_dim,
    )
  return "moe_lm", fields, optional


def model_config_from_arch(arch):
  """The zoo `config.model` ConfigDict of an `hf_spec.Arch`.

  Fields with their neutral value (False / None) are left out when the model does not have them; any other value
  the model cannot take raises ConversionError naming the field and the family.
  """
  name, fields, optional = _model_config(arch)
  known = model_fields(get_model_class(name))
  missing = [k for k in fields if k not in known]
  for key, value in optional.items():
    if key in known:
      fields[key] = value
    elif value not in (None, False):
      missing.append(f"{key}={value!r}")
  if missing:
    raise ConversionError(
      f"{arch.family}: model {name!r} has no field(s) {missing} needed to reproduce this checkpoint"
    )
  return ml_collections.ConfigDict({"name": name, **fields})


def hf_model_config(path):
  """The zoo `config.model` of the Hugging Face model directory `path` (an optional `hf:` prefix is dropped).

  Reads config.json and the safetensors headers only (`hf_spec.check_dir`: no tensor data), so a directory whose
  config.json disagrees with its tensors (e.g. num_hidden_layers=10**6 beside the weights of 2 layers) raises
  ConversionError naming the key and the tensors before any model is built.
  """
  return model_config_from_arch(hf_spec.check_dir(path).arch)


def abstract_variables(model_config):
  """ShapeDtypeStructs of every Linen collection of the model (boxed logical partitioning kept)."""
  from zoo.models.registry import build_model

  model = build_model(model_config)
  return model, jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 1), np.int32)))


def load_hf_checkpoint(path, mesh=None, shardings=None, dtype=np.float32):
  """Load a Hugging Face model directory as a zoo model config and its variables.

  Args:
    path: directory with config.json and safetensors weights (an optional `hf:` prefix is dropped).
    mesh: optional Mesh; each leaf is placed with the NamedSharding of its logical axes (`LOGICAL_AXIS_RULES`).
    shardings: optional pytree of Shardings matching the variables (`{'params': ..., 'routing_state': ...}`); wins
      over `mesh`.
    dtype: numpy dtype for floating parameters before they take the model's param dtype.

  Returns:
    (model_config ConfigDict, variables dict {'params': ..., and 'routing_state' when the model keeps one}); leaves
    are jax arrays (sharded when `mesh`/`shardings` is given).
  """
  checked = hf_spec.check_dir(path)
  model_config = model_config_from_arch(checked.arch)
  canon = hf_spec.hf_to_canonical(checked.tensors, checked.arch, fused_experts=checked.fused_experts, dtype=dtype)
  _, boxed = abstract_variables(model_config)
  import flax.linen as nn

  abstract = nn.unbox(boxed)
  values = zoo_tree.canonical_to_variables(canon, abstract)
  if shardings is None and mesh is not None:
    from zoo.layers.axes import logical_to_sharding

    shardings = logical_to_sharding(nn.get_partition_spec(boxed), mesh)
  if shardings is None:
    variables = jax.tree.map(jax.numpy.asarray, values)
  else:
    variables = jax.tree_util.tree_map_with_path(_place, values, shardings)
  return model_config, dict(variables)


def _place(path, value, sharding):
  try:
    return jax.device_put(value, sharding)
  except ValueError as e:
    raise ConversionError(
      f"variable {jax.tree_util.keystr(path)} of shape {value.shape} cannot take sharding "
      f"{sharding}: {str(e).splitlines()[0]}"
    ) from None


def check_destination(out_dir, *, overwrite=False, sources=(), option="overwrite=True"):
  """Refuse an output directory a conversion could lose data in.

  Allowed: a path that does not exist, an empty directory, or (with `overwrite`) a non-empty directory, which
  `write_dir` then replaces whole.

  Args:
    out_dir: the output directory.
    overwrite: whether a non-empty `out_dir` may be replaced.
    sources: the conversion's inputs (directories or files); `out_dir` may not be one of them, lie inside one or
      contain one (replacing it would modify the source).
    option: how the caller names `overwrite` in the message (e.g. '--overwrite' for a command line).

  Raises:
    ConversionError naming `out_dir` and what is allowed.
  """
  out = os.path.realpath(out_dir)
  for source in sources:
    src = os.path.realpath(source)
    if out == src or out.startswith(src.rstrip(os.sep) + os.sep):
      where = "is" if out == src else "is inside"
      raise ConversionError(
        f"output directory {out_dir} {where} the source {source}; allowed: a directory outside "
        "the source (a conversion never modifies its source)"
      )
    if src.startswith(out.rstrip(os.sep) + os.sep):
      raise ConversionError(
        f"output directory {out_dir} contains the source {source}; allowed: a directory that "
        "does not hold the source (a conversion never modifies its source)"
      )
  if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
    raise ConversionError(
      f"output directory {out_dir} exists and is not a directory; allowed: a new or empty directory"
    )
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ConversionError(
      f"output directory {out_dir} is not empty; allowed: a new or empty directory, or pass "
      f"{option} to replace it whole"
    )


def write_dir(out_dir, write, *, overwrite=False, sources=()):
  """Create `out_dir` whole: `write(tmp)` fills a fresh temporary sibling directory, which then takes its place.

  A failure in `write` removes the temporary directory and leaves `out_dir` as it was. With `overwrite`, an existing
  `out_dir` is renamed aside, the new directory renamed in, and only then the old one removed (if renaming in fails,
  the old one is renamed back), so `out_dir` never holds a mix of old and new files.

  Args:
    out_dir: the output directory (checked by `check_destination` with `overwrite` and `sources`).
    write: function(directory) writing the output into `directory`.
    overwrite: whether a non-empty `out_dir` may be replaced.
    sources: the conversion's inputs, which `out_dir` may not be, lie in or contain.

  Returns:
    What `write` returns.
  """
  check_destination(out_dir, overwrite=overwrite, sources=sources)
  out = os.path.abspath(out_dir)
  parent, base = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{base}.partial-{uuid.uuid4().hex[:12]}")
  os.mkdir(tmp)
  aside = None
  try:
    result = write(tmp)
    if os.path.lexists(out):
      if os.path.isdir(out) and not os.path.islink(out) and not os.listdir(out):
        os.rmdir(out)
      else:
        aside = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:12]}")
        os.rename(out, aside)
    try:
      os.rename(tmp, out)
    except BaseException:
      if aside is not None:
        os.rename(aside, out)
        aside = None
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if aside is not None:
    try:
      if os.path.islink(aside):
        os.unlink(aside)
      else:
        shutil.rmtree(aside)
    except OSError as e:
      warnings.warn(
        f"{out_dir} was replaced; its previous contents, moved to {aside}, could not be removed ({e})", stacklevel=2
      )
  return result


def save_orbax(out_dir, model_config, variables, *, overwrite=False, sources=()):
  """Write `variables` as step 0 of an orbax checkpoint in the engine's layout (`out_dir/checkpoints/0/state` with
  `params` and `collections`), so `config.init_from=out_dir` restores them, plus `out_dir/zoo_config.json`.

  `out_dir` is written whole (`write_dir`): a non-empty `out_dir` is refused unless `overwrite`, which replaces it.
  """
  import orbax.checkpoint as ocp

  variables = dict(variables)
  state = {"params": variables.pop("params"), "collections": variables}

  def write(directory):
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(directory), "checkpoints"), item_names=("state",))
    manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    manager.close()
    with open(os.path.join(directory, ZOO_CONFIG_FILE), "w") as f:
      json.dump(model_config.to_dict(), f, indent=2, sort_keys=True)

  write_dir(out_dir, write, overwrite=overwrite, sources=sources)


def convert_hf_to_orbax(hf_dir, out_dir, *, overwrite=False):
  """Convert a Hugging Face directory to an orbax checkpoint + zoo config (`save_orbax`); returns the model config.

  `out_dir` is checked first (`check_destination`: not the source, not non-empty unless `overwrite`)."""
  check_destination(out_dir, overwrite=overwrite, sources=(hf_dir,))
  model_config, variables = load_hf_checkpoint(hf_dir)
  save_orbax(out_dir, model_config, variables, overwrite=overwrite, sources=(hf_dir,))
  return model_config


def hf_config_from_model_config(model_config, family):
  """A config.json dict for `family` (one of EXPORT_FAMILIES) that describes the zoo model exactly."""
  m = model_config
  if family not in EXPORT_FAMILIES:
    raise ConversionError(f"export to Hugging Face supports {EXPORT_FAMILIES}, got family={family!r}")
  if m.name != "moe_lm" or m.get("mlp_activation", "swiglu") != "swiglu" or m.get("router") != "softmax_topk":
    raise ConversionError(
      f"{family} export needs a moe_lm with mlp_activation='swiglu' and router='softmax_topk'; got "
      f"name={m.name!r}, mlp_activation={m.get('mlp_activation')!r}, router={m.get('router')!r}"
    )
  if (
    m.moe_every != 1
    or m.first_dense_layers
    or m.get("num_shared_experts")
    or m.n_group != 1
    or (m.routed_scaling_factor != 1.0)
  ):
    raise ConversionError(
      f"{family} export needs every layer MoE without shared experts, groups or routed scaling; "
      f"got moe_every={m.moe_every}, first_dense_layers={m.first_dense_layers}, "
      f"num_shared_experts={m.get('num_shared_experts')}, n_group={m.n_group}, "
      f"routed_scaling_factor={m.routed_scaling_factor}"
    )
  if m.get("attention", "gqa") != "gqa" or m.get("qk_norm_scope", "head") != "head":
    raise ConversionError(
      f"{family} export needs attention='gqa' with per-head qk-norm; got attention="
      f"{m.get('attention')!r}, qk_norm_scope={m.get('qk_norm_scope')!r}"
    )
  qk_norm = bool(m.get("qk_norm", False))
  scaling = m.get("rope_scaling")
  scaling = dict(scaling.to_dict() if hasattr(scaling, "to_dict") else scaling or {"rope_type": "default"})
  if family == "mixtral" and (qk_norm or not m.renormalize):
    raise ConversionError("mixtral export needs qk_norm=False and renormalize=True")
  if family == "qwen3_moe" and not qk_norm:
    raise ConversionError("qwen3_moe export needs qk_norm=True (Qwen3 always normalises q and k per head)")
  common = {
    "vocab_size": m.vocab_size,
    "hidden_size": m.embed_dim,
    "num_hidden_layers": m.num_layers,
    "num_attention_heads": m.num_heads,
    "num_key_value_heads": m.num_kv_heads or m.num_heads,
    "head_dim": m.head_dim,
    "rms_norm_eps": m.norm_epsilon,
    "tie_word_embeddings": m.tie_embeddings,
    "rope_parameters": {"rope_theta": m.rope_theta, **scaling},
    "hidden_act": "silu",
    "num_experts_per_tok": m.num_experts_per_tok,
    "intermediate_size": m.mlp_dim,
    "max_position_embeddings": 4096,
    "dtype": "float32",
    "sliding_window": m.get("sliding_window"),
  }
  if family == "mixtral":
    return {
      **common,
      "architectures": ["MixtralForCausalLM"],
      "model_type": "mixtral",
      "num_local_experts": m.num_experts,
      "intermediate_size": m.expert_mlp_dim,
      "router_jitter_noise": 0.0,
    }
  return {
    **common,
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "num_experts": m.num_experts,
    "moe_intermediate_size": m.expert_mlp_dim,
    "norm_topk_prob": bool(m.renormalize),
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "attention_bias": False,
    "use_sliding_window": m.get("sliding_window") is not None,
  }


def export_hf(model_config, variables, out_dir, family, *, overwrite=False, sources=()):
  """Write a zoo MoE model as a Hugging Face directory (config.json + model.safetensors, per-expert layout).

  Args:
    model_config: the model's `config.model`.
    variables: its variables (`{'params': ...}`), jax or numpy arrays.
    out_dir: directory to create, written whole (`write_dir`).
    family: 'mixtral' or 'qwen3_moe'.
    overwrite: replace a non-empty `out_dir` whole (else it is refused: old shards or an index beside the new file
      would be loaded instead of it).
    sources: the inputs the variables came from, which `out_dir` may not be, lie in or contain.
  """
  hf_config = hf_config_from_model_config(model_config, family)
  arch = hf_spec.arch_from_config(hf_config)
  canon = zoo_tree.variables_to_canonical(dict(variables), arch.num_layers)
  tensors = hf_spec.canonical_to_hf(canon, arch)
  hf_spec.check_tensors(tensors, arch)

  def write(directory):
    safetensors_io.save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)

  write_dir(out_dir, write, overwrite=overwrite, sources=sources)
  return hf_config


class HFTokenizer:
  """A `tokenizer.json` (Hugging Face `tokenizers`) behind the interface of `zoo.data.tokenizer.ByteTokenizer`.

  bos/eos/pad ids come from config.json (`bos_token_id`, `eos_token_id`, `pad_token_id`) when present, else None.
  """

  def __init__(self, path):
    import tokenizers

    path = path[3:] if str(path).startswith("hf:") else str(path)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
      raise FileNotFoundError(f"{path} has no tokenizer.json")
    self._tok = tokenizers.Tokenizer.from_file(file)
    config = hf_spec.read_config(path) if os.path.exists(os.path.join(path, "config.json")) else {}

    def first(value):
      return value[0] if isinstance(value, list) else value

    self.bos_id = first(config.get("bos_token_id"))
    self.eos_id = first(config.get("eos_token_id"))
    self.pad_id = first(config.get("pad_token_id"))
    self.vocab_size = config.get("vocab_size", self._tok.get_vocab_size(with_added_tokens=True))

  @staticmethod
  def available(path):
    """Whether the directory has a tokenizer.json."""
    path = path[3:] if str(path).startswith("hf:") else str(path)
    return os.path.exists(os.path.join(path, "tokenizer.json"))

  def encode(self, text, *, add_bos=True, add_eos=True):
    """text (str or UTF-8 bytes) -> int32 ids [length], with BOS/EOS when the model defines them."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    elif not isinstance(text, str):
      raise TypeError(f"HFTokenizer.encode takes str or bytes, got {type(text).__name__}")
    ids = self._tok.encode(text, add_special_tokens=False).ids
    head = [self.bos_id] if add_bos and self.bos_id is not None else []
    tail = [self.eos_id] if add_eos and self.eos_id is not None else []
    return np.asarray(head + ids + tail, np.int32)

  def decode(self, ids):
    """ids [length] -> text, special tokens dropped."""
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)
