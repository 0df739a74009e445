"""The Hugging Face side of checkpoint conversion: config.json reading, tensor names and shapes per family, and the
mapping between Hugging Face tensors and a family-independent "canonical" layout.

Canonical layout (numpy, every kernel input-major as `zoo.layers.DenseGeneral` stores it):
  embed [vocab, embed]; final_norm [embed]; lm_head [embed, vocab] (absent when tied); layers: a list of dicts with
  attn_norm [embed], ffn_norm [embed], attn {...}, ffn {...}:
  - attn (GQA): q [embed, heads, head_dim], k/v [embed, kv_heads, head_dim], o [heads, head_dim, embed];
    q_bias [heads, head_dim], k_bias/v_bias [kv_heads, head_dim] (Qwen2); q_norm/k_norm [head_dim] (Qwen3, per
    head) or [heads * head_dim] / [kv_heads * head_dim] (OLMoE, over the whole projection).
  - attn (MLA): q_a [embed, q_lora_rank], q_a_norm [q_lora_rank], q_b [q_lora_rank, heads, qk_head_dim] (or q
    [embed, heads, qk_head_dim]), kv_a [embed, kv_lora_rank + qk_rope_head_dim], kv_a_norm [kv_lora_rank], kv_b
    [kv_lora_rank, heads, qk_nope_head_dim + v_head_dim], o [heads, v_head_dim, embed]. RoPE features are in the
    half-split layout of `zoo.layers.mla` (DeepSeek's interleaved pairs are permuted on the way in).
  - ffn (dense): gate/up [embed, mlp], down [mlp, embed].
  - ffn (MoE): router [embed, experts], router_bias [experts] (DeepSeek-V3 `e_score_correction_bias`),
    gate/up [experts, embed, expert_mlp], down [experts, expert_mlp, embed], shared_gate/shared_up
    [embed, shared_mlp], shared_down [shared_mlp, embed], shared_expert_gate [embed, 1] (Qwen2-MoE).
"""

import collections
import dataclasses
import json
import os
import re

import numpy as np

from zoo.layers.rope import ROPE_TYPES

SUPPORTED = {
  "llama": "LlamaForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
  "mixtral": "MixtralForCausalLM",
  "olmoe": "OlmoeForCausalLM",
  "qwen2_moe": "Qwen2MoeForCausalLM",
  "qwen3_moe": "Qwen3MoeForCausalLM",
  "deepseek_v3": "DeepseekV3ForCausalLM",
}
MOE_FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3")


class ConversionError(ValueError):
  """A Hugging Face checkpoint cannot be converted; the message names the tensor, field or architecture."""


def read_config(directory):
  """The parsed `config.json` of a Hugging Face model directory; ConversionError naming the file when it is missing,
  not valid JSON or not a JSON object."""
  if not os.path.isdir(directory):
    raise ConversionError(
      f"{directory}: "
      + ("is not a directory" if os.path.exists(directory) else "no such directory")
      + "; expected a Hugging Face model directory"
    )
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise ConversionError(f"{directory} has no config.json; expected a Hugging Face model directory")
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(config, dict):
    raise ConversionError(f"{path}: a JSON {type(config).__name__}, not an object of settings")
  return config


def model_type(config):
  """The family (`model_type`) of a config dict, checked against SUPPORTED."""
  kind = config.get("model_type")
  if kind not in SUPPORTED:
    raise ConversionError(
      f"unsupported architecture: model_type={kind!r}, architectures="
      f"{config.get('architectures')}; supported model types: {sorted(SUPPORTED)} "
      f"({sorted(SUPPORTED.values())})"
    )
  return kind


# The largest size a config.json may give (anything above is absurd: no tensor dimension is that large).
MAX_SIZE = 2**31 - 1
_REQUIRED = object()


def _size(config, *names, minimum=1, default=_REQUIRED):
  """The integer setting of the first of `names` that config.json sets (not null), else `default`.

  Raises ConversionError naming the key when it is missing (and required) or not an integer in [minimum, MAX_SIZE].
  """
  for name in names:
    if config.get(name) is not None:
      value = config[name]
      if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_SIZE:
        raise ConversionError(
          f"config.json {name}={value!r} is not a valid size; allowed: an integer from {minimum} to {MAX_SIZE}"
        )
      return value
  if default is _REQUIRED:
    raise ConversionError(
      f"config.json has no {' / '.join(repr(n) for n in names)} (model_type={config.get('model_type')!r} needs it)"
    )
  return default


def _number(config, name, default):
  """The positive float setting `name` of config.json (`default` when unset); ConversionError naming the key."""
  value = config.get(name)
  if value is None:
    return float(default)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
    raise ConversionError(f"config.json {name}={value!r} is not valid; allowed: a positive number")
  return float(value)


def rope_settings(config):
  """(theta, scaling dict or None) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4.x)."""
  for key in ("rope_parameters", "rope_scaling"):
    if not isinstance(config.get(key) or {}, dict):
      raise ConversionError(f"config.json {key}={config[key]!r} is not an object; allowed: null or an object")
  params = dict(config.get("rope_parameters") or {})
  theta = _number({"rope_theta": config.get("rope_theta"), **params}, "rope_theta", 10000.0)
  params.pop("rope_theta", None)
  scaling = params or dict(config.get("rope_scaling") or {})
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind not in ROPE_TYPES:
    raise ConversionError(f"RoPE scaling rope_type={kind!r} is not supported; supported: {ROPE_TYPES}")
  scaling.setdefault("rope_type", kind)
  if kind == "yarn" and "original_max_position_embeddings" not in scaling:
    raise ConversionError("rope_parameters of type yarn need original_max_position_embeddings")
  return theta, scaling


@dataclasses.dataclass(frozen=True)
class Arch:
  """The shape-relevant facts of one Hugging Face model, read from its config.json."""

  family: str
  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  norm_epsilon: float
  rope_theta: float
  rope_scaling: dict | None
  tie_embeddings: bool
  qkv_bias: bool
  qk_norm: str | None  # None, "head" (Qwen3) or "full" (OLMoE)
  sliding_window: int | None
  moe_layers: tuple  # bool per layer
  num_experts: int = 0
  experts_per_token: int = 0
  expert_mlp_dim: int = 0
  shared_mlp_dim: int = 0
  shared_expert_gate: bool = False
  router: str = "softmax"  # "softmax" or "sigmoid"
  renormalize: bool = True
  routed_scaling_factor: float = 1.0
  n_group: int = 1
  topk_group: int = 1
  router_bias: bool = False
  # MLA (DeepSeek-V3)
  mla: bool = False
  q_lora_rank: int | None = None
  kv_lora_rank: int = 0
  qk_nope_head_dim: int = 0
  qk_rope_head_dim: int = 0
  v_head_dim: int = 0
  rope_interleave: bool = False
  first_dense_layers: int = 0
  moe_every: int = 1
  mtp_layers: int = 0


def arch_from_config(config):
  """Read an `Arch` from a config.json dict; raises ConversionError for unsupported families or options."""
  family = model_type(config)
  if config.get("quantization_config"):
    quant = config["quantization_config"]
    raise ConversionError(
      f"quantized checkpoints are not supported (quantization_config="
      f"{quant.get('quant_method', '?') if isinstance(quant, dict) else quant!r}); use a "
      "bf16/fp32 checkpoint"
    )
  act = config.get("hidden_act", "silu")
  if act != "silu":
    raise ConversionError(f"hidden_act={act!r} is not supported; the zoo's SwiGLU needs 'silu'")
  embed = _size(config, "hidden_size")
  heads = _size(config, "num_attention_heads")
  kv_heads = _size(config, "num_key_value_heads", default=heads)
  if heads % kv_heads:
    raise ConversionError(
      f"config.json num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
    )
  theta, scaling = rope_settings(config)
  layers = _size(config, "num_hidden_layers")
  attention_bias = bool(config.get("attention_bias", False))
  if attention_bias and family != "deepseek_v3":
    raise ConversionError(
      f"{family}: attention_bias=True (an output-projection bias) is not supported by "
      "zoo.layers.Attention; only q/k/v biases (Qwen2) are"
    )
  layer_types = config.get("layer_types") or []
  if any(t != "full_attention" for t in layer_types):
    raise ConversionError(
      f"{family}: layer_types={layer_types} mixes attention types; only full_attention layers are supported"
    )
  window = _size(config, "sliding_window", minimum=0, default=None) if config.get("use_sliding_window", True) else None
  if family in ("qwen2", "qwen3", "qwen2_moe") and not config.get("use_sliding_window", False):
    window = None
  common = dict(
    family=family,
    vocab_size=_size(config, "vocab_size"),
    embed_dim=embed,
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=_size(config, "head_dim", default=max(embed // heads, 1)),
    mlp_dim=_size(config, "intermediate_size"),
    norm_epsilon=_number(config, "rms_norm_eps", 1e-6),
    rope_theta=theta,
    rope_scaling=scaling,
    tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    qkv_bias=family == "qwen2" or (family == "qwen2_moe" and config.get("qkv_bias", True)),
    qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(family),
    sliding_window=window or None,
    moe_layers=(False,) * layers,
  )
  if family == "olmoe" and config.get("clip_qkv") is not None:
    raise ConversionError(f"olmoe: clip_qkv={config['clip_qkv']} is not supported (only clip_qkv=null)")
  if family not in MOE_FAMILIES:
    return Arch(**common)
  experts = _size(
    config,
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    minimum=0 if family in ("qwen2_moe", "qwen3_moe") else 1,
  )
  per_token = _size(config, "num_experts_per_tok")
  if experts and per_token > experts:
    raise ConversionError(f"config.json num_experts_per_tok={per_token} exceeds the {experts} experts")
  moe = dict(
    num_experts=experts,
    experts_per_token=per_token,
    expert_mlp_dim=_size(config, "moe_intermediate_size", "intermediate_size"),
    renormalize=family == "mixtral" or bool(config.get("norm_topk_prob", False)),
  )
  if family in ("mixtral", "olmoe"):
    if family == "mixtral" and config.get("router_jitter_noise"):
      raise ConversionError(
        f"mixtral: router_jitter_noise={config['router_jitter_noise']} is a training-time "
        "option the converter does not carry; set it to 0"
      )
    return Arch(**{**common, "moe_layers": (True,) * layers}, **moe)
  if family in ("qwen2_moe", "qwen3_moe"):
    step, dense_only = _size(config, "decoder_sparse_step", default=1), set(config.get("mlp_only_layers") or [])
    flags = tuple(i not in dense_only and experts > 0 and (i + 1) % step == 0 for i in range(layers))
    shared = _size(config, "shared_expert_intermediate_size", minimum=0, default=0) if family == "qwen2_moe" else 0
    return Arch(
      **{**common, "moe_layers": flags}, **moe, shared_mlp_dim=shared, shared_expert_gate=shared > 0, moe_every=step
    )
  # deepseek_v3
  first = _size(config, "first_k_dense_replace", minimum=0, default=0)
  every = _size(config, "moe_layer_freq", default=1)
  flags = tuple(i >= first and i % every == 0 for i in range(layers))
  if config.get("topk_method", "noaux_tc") != "noaux_tc" or config.get("scoring_func", "sigmoid") != "sigmoid":
    raise ConversionError(
      f"deepseek_v3: topk_method={config.get('topk_method')!r} / scoring_func="
      f"{config.get('scoring_func')!r} are not supported (only 'noaux_tc' with 'sigmoid')"
    )
  rope_dim = _size(config, "qk_rope_head_dim")
  return Arch(
    **{**common, "moe_layers": flags, "qk_norm": None, "head_dim": rope_dim},
    **moe,
    shared_mlp_dim=moe["expert_mlp_dim"] * _size(config, "n_shared_experts", minimum=0, default=0),
    router="sigmoid",
    routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
    n_group=_size(config, "n_group", default=1),
    topk_group=_size(config, "topk_group", default=1),
    router_bias=True,
    mla=True,
    q_lora_rank=_size(config, "q_lora_rank", default=None),
    kv_lora_rank=_size(config, "kv_lora_rank"),
    qk_nope_head_dim=_size(config, "qk_nope_head_dim"),
    qk_rope_head_dim=rope_dim,
    v_head_dim=_size(config, "v_head_dim"),
    rope_interleave=bool(config.get("rope_interleave", True)),
    first_dense_layers=first,
    moe_every=every,
    mtp_layers=_size(config, "num_nextn_predict_layers", minimum=0, default=0),
  )


# ------------------------------------------------------------------------------------------------ HF tensor names


def _expert_names(arch):
  """(per-expert prefix inside the layer, gate, up, down names) for the family's per-expert layout."""
  if arch.family == "mixtral":
    return "block_sparse_moe", "w1", "w3", "w2"
  return "mlp", "gate_proj", "up_proj", "down_proj"


def expected_tensors(arch, fused_experts=False):
  """Every tensor name of the HF checkpoint with its shape (nn.Linear weights are [out, in])."""
  a, d = arch, arch.embed_dim
  shapes = {"model.embed_tokens.weight": (a.vocab_size, d), "model.norm.weight": (d,)}
  if not a.tie_embeddings:
    shapes["lm_head.weight"] = (a.vocab_size, d)
  for i in range(a.num_layers):
    p = f"model.layers.{i}."
    shapes[p + "input_layernorm.weight"] = (d,)
    shapes[p + "post_attention_layernorm.weight"] = (d,)
    s = p + "self_attn."
    if a.mla:
      qk = a.qk_nope_head_dim + a.qk_rope_head_dim
      if a.q_lora_rank is None:
        shapes[s + "q_proj.weight"] = (a.num_heads * qk, d)
      else:
        shapes[s + "q_a_proj.weight"] = (a.q_lora_rank, d)
        shapes[s + "q_a_layernorm.weight"] = (a.q_lora_rank,)
        shapes[s + "q_b_proj.weight"] = (a.num_heads * qk, a.q_lora_rank)
      shapes[s + "kv_a_proj_with_mqa.weight"] = (a.kv_lora_rank + a.qk_rope_head_dim, d)
      shapes[s + "kv_a_layernorm.weight"] = (a.kv_lora_rank,)
      shapes[s + "kv_b_proj.weight"] = (a.num_heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank)
      shapes[s + "o_proj.weight"] = (d, a.num_heads * a.v_head_dim)
    else:
      hq, hkv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
      shapes.update(
        {
          s + "q_proj.weight": (hq, d),
          s + "k_proj.weight": (hkv, d),
          s + "v_proj.weight": (hkv, d),
          s + "o_proj.weight": (d, hq),
        }
      )
      if a.qkv_bias:
        shapes.update({s + "q_proj.bias": (hq,), s + "k_proj.bias": (hkv,), s + "v_proj.bias": (hkv,)})
      if a.qk_norm == "head":
        shapes.update({s + "q_norm.weight": (a.head_dim,), s + "k_norm.weight": (a.head_dim,)})
      elif a.qk_norm == "full":
        shapes.update({s + "q_norm.weight": (hq,), s + "k_norm.weight": (hkv,)})
    if not a.moe_layers[i]:
      shapes.update(
        {
          p + "mlp.gate_proj.weight": (a.mlp_dim, d),
          p + "mlp.up_proj.weight": (a.mlp_dim, d),
          p + "mlp.down_proj.weight": (d, a.mlp_dim),
        }
      )
      continue
    block, g, u, dn = _expert_names(a)
    f = a.expert_mlp_dim
    if fused_experts:
      shapes[p + "mlp.gate.weight"] = (a.num_experts, d)
      shapes[p + "mlp.experts.gate_up_proj"] = (a.num_experts, 2 * f, d)
      shapes[p + "mlp.experts.down_proj"] = (a.num_experts, d, f)
    else:
      shapes[p + block + ".gate.weight"] = (a.num_experts, d)
      for e in range(a.num_experts):
        x = f"{p}{block}.experts.{e}."
        shapes.update({x + g + ".weight": (f, d), x + u + ".weight": (f, d), x + dn + ".weight": (d, f)})
    if a.router_bias:
      shapes[p + "mlp.gate.e_score_correction_bias"] = (a.num_experts,)
    if a.shared_mlp_dim:
      sh = p + ("mlp.shared_experts." if a.family == "deepseek_v3" else "mlp.shared_expert.")
      fs = a.shared_mlp_dim
      shapes.update(
        {sh + "gate_proj.weight": (fs, d), sh + "up_proj.weight": (fs, d), sh + "down_proj.weight": (d, fs)}
      )
    if a.shared_expert_gate:
      shapes[p + "mlp.shared_expert_gate.weight"] = (1, d)
  return shapes


_IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)
# Floating dtypes a parameter may be stored in (safetensors header names), and numpy dtype names -> header names.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_HEADER_DTYPES = {
  "float64": "F64",
  "float32": "F32",
  "float16": "F16",
  "bfloat16": "BF16",
  "int64": "I64",
  "int32": "I32",
  "int16": "I16",
  "int8": "I8",
  "uint64": "U64",
  "uint32": "U32",
  "uint16": "U16",
  "uint8": "U8",
  "bool": "BOOL",
  "float8_e4m3fn": "F8_E4M3",
  "float8_e5m2": "F8_E5M2",
}


def _describe(tensors):
  """name -> (file or None, dtype as a safetensors header names it, shape tuple), without reading tensor data when
  `tensors` is a `safetensors_io.Tensors` (it has `info(name)`); else from the arrays' dtype and shape."""
  info = getattr(tensors, "info", None)
  out = {}
  for name in tensors:
    if info is not None:
      i = info(name)
      out[name] = (i.file, i.dtype, tuple(i.shape))
    else:
      value = tensors[name]
      dtype = np.dtype(value.dtype).name
      out[name] = (None, _HEADER_DTYPES.get(dtype, dtype), tuple(np.shape(value)))
  return out


def _in(file):
  return f" in {file}" if file else ""


def _experts_key(arch):
  return {"mixtral": "num_local_experts", "deepseek_v3": "n_routed_experts"}.get(arch.family, "num_experts")


def _check_counts(described, arch):
  """ConversionError naming num_hidden_layers / the experts key when the checkpoint holds another number of layers
  or experts (checked before the expected tensor names are listed: a config with 10**6 layers fails at once)."""
  layers = {}
  for name in sorted(described):
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
      layers.setdefault(int(m.group(1)), name)
  found = max(layers) + 1 if layers else 0
  if not arch.num_layers <= found <= arch.num_layers + arch.mtp_layers:
    held = "no model.layers.* tensors"
    if layers:
      first, last = layers[min(layers)], layers[max(layers)]
      held = (
        f"layers {min(layers)} to {max(layers)} ({first}{_in(described[first][0])} ... {last}{_in(described[last][0])})"
      )
    extra = f" plus {arch.mtp_layers} multi-token-prediction layers" if arch.mtp_layers else ""
    raise ConversionError(
      f"config.json num_hidden_layers={arch.num_layers}{extra} disagrees with the checkpoint, whose tensors hold {held}"
    )
  experts = {}
  for name in sorted(described):
    m = re.match(r"model\.layers\.(\d+)\.\w+\.experts\.(\d+)\.", name)
    if m and int(m.group(1)) < arch.num_layers:
      experts.setdefault(int(m.group(2)), name)
  if experts and max(experts) + 1 != arch.num_experts:
    last = experts[max(experts)]
    raise ConversionError(
      f"config.json {_experts_key(arch)}={arch.num_experts} disagrees with the checkpoint, "
      f"whose tensors hold experts 0 to {max(experts)} ({last}{_in(described[last][0])})"
    )


def _anchors(arch, fused_experts):
  """(config.json keys {key: value}, expected size, HF tensor, axis): for every size key, one tensor dimension that
  it alone (or with the keys listed) determines, so that a disagreement names the key."""
  a, s = arch, "model.layers.0.self_attn."
  out = [
    ({"vocab_size": a.vocab_size}, a.vocab_size, "model.embed_tokens.weight", 0),
    ({"hidden_size": a.embed_dim}, a.embed_dim, "model.embed_tokens.weight", 1),
  ]
  if a.mla:
    if a.q_lora_rank is not None:
      out.append(({"q_lora_rank": a.q_lora_rank}, a.q_lora_rank, s + "q_a_proj.weight", 0))
    out += [
      ({"kv_lora_rank": a.kv_lora_rank}, a.kv_lora_rank, s + "kv_a_layernorm.weight", 0),
      (
        {"kv_lora_rank": a.kv_lora_rank, "qk_rope_head_dim": a.qk_rope_head_dim},
        a.kv_lora_rank + a.qk_rope_head_dim,
        s + "kv_a_proj_with_mqa.weight",
        0,
      ),
      (
        {"num_attention_heads": a.num_heads, "v_head_dim": a.v_head_dim},
        a.num_heads * a.v_head_dim,
        s + "o_proj.weight",
        1,
      ),
      (
        {"num_attention_heads": a.num_heads, "qk_nope_head_dim": a.qk_nope_head_dim, "v_head_dim": a.v_head_dim},
        a.num_heads * (a.qk_nope_head_dim + a.v_head_dim),
        s + "kv_b_proj.weight",
        0,
      ),
    ]
  else:
    if a.qk_norm == "head":
      out.append(({"head_dim": a.head_dim}, a.head_dim, s + "q_norm.weight", 0))
    out += [
      ({"num_attention_heads": a.num_heads, "head_dim": a.head_dim}, a.num_heads * a.head_dim, s + "q_proj.weight", 0),
      (
        {"num_key_value_heads": a.num_kv_heads, "head_dim": a.head_dim},
        a.num_kv_heads * a.head_dim,
        s + "k_proj.weight",
        0,
      ),
    ]
  dense = [i for i, moe in enumerate(a.moe_layers) if not moe]
  if dense:
    out.append(({"intermediate_size": a.mlp_dim}, a.mlp_dim, f"model.layers.{dense[0]}.mlp.gate_proj.weight", 0))
  moe = [i for i, flag in enumerate(a.moe_layers) if flag]
  if moe:
    p = f"model.layers.{moe[0]}."
    block, gate, _, _ = _expert_names(a)
    mlp_key = "intermediate_size" if a.family in ("mixtral", "olmoe") else "moe_intermediate_size"
    if fused_experts:
      out += [
        ({_experts_key(a): a.num_experts}, a.num_experts, p + "mlp.gate.weight", 0),
        ({mlp_key: a.expert_mlp_dim}, 2 * a.expert_mlp_dim, p + "mlp.experts.gate_up_proj", 1),
      ]
    else:
      out += [
        ({_experts_key(a): a.num_experts}, a.num_experts, p + block + ".gate.weight", 0),
        ({mlp_key: a.expert_mlp_dim}, a.expert_mlp_dim, f"{p}{block}.experts.0.{gate}.weight", 0),
      ]
    if a.shared_mlp_dim and a.family == "deepseek_v3":
      out.append(
        (
          {"moe_intermediate_size": a.expert_mlp_dim, "n_shared_experts": a.shared_mlp_dim // a.expert_mlp_dim},
          a.shared_mlp_dim,
          p + "mlp.shared_experts.gate_proj.weight",
          0,
        )
      )
    elif a.shared_mlp_dim:
      out.append(
        (
          {"shared_expert_intermediate_size": a.shared_mlp_dim},
          a.shared_mlp_dim,
          p + "mlp.shared_expert.gate_proj.weight",
          0,
        )
      )
  return out


def _size_problems(described, arch, fused_experts):
  """One line per config.json size key that disagrees with the tensor shapes (see `_anchors`), naming the key(s),
  the tensor and its file."""
  problems = []
  for keys, size, name, axis in _anchors(arch, fused_experts):
    if name not in described or len(described[name][2]) <= axis or described[name][2][axis] == size:
      continue
    file, _, shape = described[name]
    given = ", ".join(f"{k}={v}" for k, v in keys.items())
    problems.append(f"{given} gives {size} but {name}{_in(file)} has shape {shape} (axis {axis})")
  return problems


def check_tensors(tensors, arch):
  """Validate the checkpoint's tensors against the config; returns whether experts are stored fused.

  Reads shapes and dtypes only (from the headers when `tensors` is a `safetensors_io.Tensors`). Raises
  ConversionError, naming the tensors and their files:
  - for a number of layers or experts in config.json that the tensors do not hold (key named);
  - for a parameter stored as integers or bools (they are never cast to float);
  - listing every missing or unexpected tensor and every shape mismatch (expected vs found), led by the
    config.json size keys that disagree with a tensor dimension (see `_anchors`).
  Ignored: `rotary_emb.inv_freq` buffers, a tied `lm_head.weight`, and DeepSeek's multi-token-prediction layers
  (`model.layers.{n}` for n >= num_hidden_layers).
  """
  if any(name.endswith("weight_scale_inv") for name in tensors):
    raise ConversionError(
      "the checkpoint holds FP8 block-quantised weights (*.weight_scale_inv); dequantise it to bf16 first"
    )
  described = _describe(tensors)
  _check_counts(described, arch)
  names = set(described)
  for name in list(names):
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if (
      any(p.match(name) for p in _IGNORED)
      or (name == "lm_head.weight" and arch.tie_embeddings)
      or (m and arch.mtp_layers and int(m.group(1)) >= arch.num_layers)
    ):
      names.discard(name)
  fused = any(".experts.gate_up_proj" in n for n in names)
  expected = expected_tensors(arch, fused_experts=fused)
  present = sorted(names & set(expected))
  integral = [f"{n}{_in(described[n][0])}: {described[n][1]}" for n in present if described[n][1] not in FLOAT_DTYPES]
  if integral:
    raise ConversionError(
      f"tensors that are not floating point ({len(integral)}): {_clip(integral)}; the model's "
      f"parameters are, and integer or bool tensors are never cast; allowed dtypes: "
      f"{', '.join(FLOAT_DTYPES)}"
    )
  missing = sorted(set(expected) - names)
  unexpected = sorted(names - set(expected))
  mismatched = [
    f"{n}: expected {expected[n]}, found {described[n][2]}" + (f" ({described[n][0]})" if described[n][0] else "")
    for n in present
    if described[n][2] != expected[n]
  ]
  problems = []
  sizes = _size_problems(described, arch, fused) if mismatched else []
  if sizes:
    problems.append(f"config.json sizes that disagree with the tensors ({len(sizes)}): {_clip(sizes)}")
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {_clip(missing)}")
  if unexpected:
    problems.append(
      f"unexpected tensors ({len(unexpected)}): " + _clip([f"{n}{_in(described[n][0])}" for n in unexpected])
    )
  if mismatched:
    problems.append(f"shape mismatches ({len(mismatched)}): {_clip(mismatched)}")
  if problems:
    raise ConversionError(f"{arch.family} checkpoint does not match its config.json: " + "; ".join(problems))
  return fused


def _clip(items, limit=8):
  return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


HFDirectory = collections.namedtuple("HFDirectory", ["path", "config", "arch", "tensors", "fused_experts"])
HFDirectory.__doc__ = """A checked Hugging Face model directory: its path, config.json dict, `Arch`, tensors (a
`safetensors_io.Tensors` mapping, read on access) and whether the experts are stored fused."""


def check_dir(path):
  """Check a Hugging Face model directory from its config.json and its safetensors headers only (no tensor data is
  read and nothing is allocated), so that an inconsistent directory is refused before any model is built.

  Checks: config.json is a JSON object with valid sizes for a supported family; the index (if any) names shards
  inside the directory that exist; every file's header is well formed; the tensors' names, shapes and dtypes are
  those the family expects from config.json (`check_tensors`).

  Args:
    path: the directory (an optional `hf:` prefix is dropped).

  Returns:
    HFDirectory.

  Raises:
    ConversionError (or its subclass `safetensors_io.SafetensorsError`) with one line naming the file, key or tensor.
  """
  from zoo.checkpoints import safetensors_io  # it imports this module (for ConversionError)

  path = path[3:] if str(path).startswith("hf:") else str(path)
  config = read_config(path)
  arch = arch_from_config(config)
  tensors = safetensors_io.load_dir(path)
  fused = check_tensors(tensors, arch)
  return HFDirectory(path, config, arch, tensors, fused)


# ------------------------------------------------------------------------------------------- HF <-> canonical


def rope_order(dim):
  """Interleaved pair order (0,1),(2,3).. -> half-split order: [0, 2, 4, .., 1, 3, 5, ..]."""
  return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


def hf_to_canonical(tensors, arch, *, fused_experts=False, dtype=np.float32):
  """Map HF tensors (validated by `check_tensors`) to the canonical layout, cast to `dtype`."""
  a, d = arch, arch.embed_dim

  def floating(name):
    value = np.asarray(tensors[name])
    if _HEADER_DTYPES.get(value.dtype.name) not in FLOAT_DTYPES:
      file = tensors.info(name).file if hasattr(tensors, "info") else None
      raise ConversionError(
        f"tensor {name}{_in(file)} has dtype {value.dtype}; integer and bool tensors are never "
        f"cast to the model's floating parameters (allowed: {', '.join(FLOAT_DTYPES)})"
      )
    return value

  def t(name):
    return floating(name).astype(dtype)

  def lin(name, *out_shape):
    """nn.Linear [out, in] -> [in, *out_shape]."""
    w = t(name)
    return w.T.reshape(w.shape[1], *out_shape) if out_shape else w.T

  out = {"embed": t("model.embed_tokens.weight"), "final_norm": t("model.norm.weight"), "layers": []}
  if not a.tie_embeddings:
    out["lm_head"] = t("lm_head.weight").T
  for i in range(a.num_layers):
    p, s = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
    layer = {"attn_norm": t(p + "input_layernorm.weight"), "ffn_norm": t(p + "post_attention_layernorm.weight")}
    if a.mla:
      qk, rope = a.qk_nope_head_dim + a.qk_rope_head_dim, a.qk_rope_head_dim
      perm = rope_order(rope) if a.rope_interleave else np.arange(rope)
      head_perm = np.concatenate([np.arange(a.qk_nope_head_dim), a.qk_nope_head_dim + perm])
      attn = {}
      if a.q_lora_rank is None:
        attn["q"] = lin(s + "q_proj.weight", a.num_heads, qk)[..., head_perm]
      else:
        attn["q_a"] = lin(s + "q_a_proj.weight")
        attn["q_a_norm"] = t(s + "q_a_layernorm.weight")
        attn["q_b"] = lin(s + "q_b_proj.weight", a.num_heads, qk)[..., head_perm]
      kv_a = lin(s + "kv_a_proj_with_mqa.weight")
      attn["kv_a"] = np.concatenate([kv_a[:, : a.kv_lora_rank], kv_a[:, a.kv_lora_rank :][:, perm]], axis=1)
      attn["kv_a_norm"] = t(s + "kv_a_layernorm.weight")
      attn["kv_b"] = lin(s + "kv_b_proj.weight", a.num_heads, a.qk_nope_head_dim + a.v_head_dim)
      attn["o"] = lin(s + "o_proj.weight").reshape(a.num_heads, a.v_head_dim, d)
    else:
      attn = {
        "q": lin(s + "q_proj.weight", a.num_heads, a.head_dim),
        "k": lin(s + "k_proj.weight", a.num_kv_heads, a.head_dim),
        "v": lin(s + "v_proj.weight", a.num_kv_heads, a.head_dim),
        "o": lin(s + "o_proj.weight").reshape(a.num_heads, a.head_dim, d),
      }
      if a.qkv_bias:
        attn["q_bias"] = t(s + "q_proj.bias").reshape(a.num_heads, a.head_dim)
        attn["k_bias"] = t(s + "k_proj.bias").reshape(a.num_kv_heads, a.head_dim)
        attn["v_bias"] = t(s + "v_proj.bias").reshape(a.num_kv_heads, a.head_dim)
      if a.qk_norm:
        attn["q_norm"], attn["k_norm"] = t(s + "q_norm.weight"), t(s + "k_norm.weight")
    layer["attn"] = attn
    if not a.moe_layers[i]:
      layer["ffn"] = {
        "gate": lin(p + "mlp.gate_proj.weight"),
        "up": lin(p + "mlp.up_proj.weight"),
        "down": lin(p + "mlp.down_proj.weight"),
      }
    else:
      block, g, u, dn = _expert_names(a)
      f = a.expert_mlp_dim
      if fused_experts:
        router = lin(p + "mlp.gate.weight")
        gate_up = t(p + "mlp.experts.gate_up_proj")  # [E, 2F, D]: gate rows first, then up
        gate, up = gate_up[:, :f].transpose(0, 2, 1), gate_up[:, f:].transpose(0, 2, 1)
        down = t(p + "mlp.experts.down_proj").transpose(0, 2, 1)
      else:
        router = lin(p + block + ".gate.weight")
        x = f"{p}{block}.experts."
        gate = np.stack([lin(f"{x}{e}.{g}.weight") for e in range(a.num_experts)])
        up = np.stack([lin(f"{x}{e}.{u}.weight") for e in range(a.num_experts)])
        down = np.stack([lin(f"{x}{e}.{dn}.weight") for e in range(a.num_experts)])
      ffn = {"router": router, "gate": gate, "up": up, "down": down}
      if a.router_bias:
        ffn["router_bias"] = floating(p + "mlp.gate.e_score_correction_bias").astype(np.float32)
      if a.shared_mlp_dim:
        sh = p + ("mlp.shared_experts." if a.family == "deepseek_v3" else "mlp.shared_expert.")
        ffn.update(
          shared_gate=lin(sh + "gate_proj.weight"),
          shared_up=lin(sh + "up_proj.weight"),
          shared_down=lin(sh + "down_proj.weight"),
        )
      if a.shared_expert_gate:
        ffn["shared_expert_gate"] = lin(p + "mlp.shared_expert_gate.weight")
      layer["ffn"] = ffn
    out["layers"].append(layer)
  return out


def canonical_to_hf(canon, arch):
  """The inverse of `hf_to_canonical`, writing experts in the per-expert layout (what `save_pretrained` writes)."""
  a, d = arch, arch.embed_dim

  def lin(w):
    """[in, *out] -> nn.Linear [out, in]."""
    w = np.asarray(w)
    return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)

  out = {"model.embed_tokens.weight": np.asarray(canon["embed"]), "model.norm.weight": np.asarray(canon["final_norm"])}
  if not a.tie_embeddings:
    out["lm_head.weight"] = lin(canon["lm_head"])
  for i, layer in enumerate(canon["layers"]):
    p, s = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
    out[p + "input_layernorm.weight"] = np.asarray(layer["attn_norm"])
    out[p + "post_attention_layernorm.weight"] = np.asarray(layer["ffn_norm"])
    attn = layer["attn"]
    if a.mla:
      rope = a.qk_rope_head_dim
      inv = np.argsort(rope_order(rope)) if a.rope_interleave else np.arange(rope)
      head_inv = np.concatenate([np.arange(a.qk_nope_head_dim), a.qk_nope_head_dim + inv])
      if a.q_lora_rank is None:
        out[s + "q_proj.weight"] = lin(np.asarray(attn["q"])[..., head_inv])
      else:
        out[s + "q_a_proj.weight"] = lin(attn["q_a"])
        out[s + "q_a_layernorm.weight"] = np.asarray(attn["q_a_norm"])
        out[s + "q_b_proj.weight"] = lin(np.asarray(attn["q_b"])[..., head_inv])
      kv_a = np.asarray(attn["kv_a"])
      out[s + "kv_a_proj_with_mqa.weight"] = lin(
        np.concatenate([kv_a[:, : a.kv_lora_rank], kv_a[:, a.kv_lora_rank :][:, inv]], axis=1)
      )
      out[s + "kv_a_layernorm.weight"] = np.asarray(attn["kv_a_norm"])
      out[s + "kv_b_proj.weight"] = lin(attn["kv_b"])
    else:
      for name in "qkv":
        out[s + f"{name}_proj.weight"] = lin(attn[name])
        if a.qkv_bias:
          out[s + f"{name}_proj.bias"] = np.asarray(attn[name + "_bias"]).reshape(-1)
      if a.qk_norm:
        out[s + "q_norm.weight"] = np.asarray(attn["q_norm"]).reshape(-1)
        out[s + "k_norm.weight"] = np.asarray(attn["k_norm"]).reshape(-1)
    o = np.asarray(attn["o"])
    out[s + "o_proj.weight"] = np.ascontiguousarray(o.reshape(-1, d).T)
    ffn = layer["ffn"]
    if not a.moe_layers[i]:
      for name in ("gate", "up", "down"):
        out[p + f"mlp.{name}_proj.weight"] = lin(ffn[name])
      continue
    block, g, u, dn = _expert_names(a)
    out[p + block + ".gate.weight"] = lin(ffn["router"])
    for e in range(a.num_experts):
      x = f"{p}{block}.experts.{e}."
      out[x + g + ".weight"] = lin(np.asarray(ffn["gate"])[e])
      out[x + u + ".weight"] = lin(np.asarray(ffn["up"])[e])
      out[x + dn + ".weight"] = lin(np.asarray(ffn["down"])[e])
    if a.router_bias:
      out[p + "mlp.gate.e_score_correction_bias"] = np.asarray(ffn["router_bias"])
    if a.shared_mlp_dim:
      sh = p + ("mlp.shared_experts." if a.family == "deepseek_v3" else "mlp.shared_expert.")
      for name in ("gate", "up", "down"):
        out[sh + f"{name}_proj.weight"] = lin(ffn["shared_" + name])
    if a.shared_expert_gate:
      out[p + "mlp.shared_expert_gate.weight"] = lin(ffn["shared_expert_gate"])
  return out
