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
import dataclasses
import json
import os
import re

import numpy as np

from zoo.layers.rope import ROPE_TYPES

SUPPORTED = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
}
MOE_FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3")


class ConversionError(ValueError):
  """A Hugging Face checkpoint cannot be converted; the message names the tensor, field or architecture."""


def read_config(directory):
  """The parsed `config.json` of a Hugging Face model directory."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise ConversionError(f"{directory} has no config.json; expected a Hugging Face model directory")
  with open(path) as f:
    return json.load(f)


def model_type(config):
  """The family (`model_type`) of a config dict, checked against SUPPORTED."""
  kind = config.get("model_type")
  if kind not in SUPPORTED:
    raise ConversionError(f"unsupported architecture: model_type={kind!r}, architectures="
                          f"{config.get('architectures')}; supported model types: {sorted(SUPPORTED)} "
                          f"({sorted(SUPPORTED.values())})")
  return kind


def _get(config, *names, default=None):
  for name in names:
    if config.get(name) is not None:
      return config[name]
  return default


def rope_settings(config):
  """(theta, scaling dict or None) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4.x)."""
  params = dict(config.get("rope_parameters") or {})
  theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
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
    raise ConversionError(f"quantized checkpoints are not supported (quantization_config="
                          f"{config['quantization_config'].get('quant_method', '?')}); use a bf16/fp32 checkpoint")
  act = config.get("hidden_act", "silu")
  if act != "silu":
    raise ConversionError(f"hidden_act={act!r} is not supported; the zoo's SwiGLU needs 'silu'")
  embed = config["hidden_size"]
  heads = config["num_attention_heads"]
  kv_heads = _get(config, "num_key_value_heads", default=heads)
  theta, scaling = rope_settings(config)
  layers = config["num_hidden_layers"]
  attention_bias = bool(config.get("attention_bias", False))
  if attention_bias and family != "deepseek_v3":
    raise ConversionError(f"{family}: attention_bias=True (an output-projection bias) is not supported by "
                          "zoo.layers.Attention; only q/k/v biases (Qwen2) are")
  layer_types = config.get("layer_types") or []
  if any(t != "full_attention" for t in layer_types):
    raise ConversionError(f"{family}: layer_types={layer_types} mixes attention types; only full_attention "
                          "layers are supported")
  window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
  if family in ("qwen2", "qwen3", "qwen2_moe") and not config.get("use_sliding_window", False):
    window = None
  common = dict(
      family=family, vocab_size=config["vocab_size"], embed_dim=embed, num_layers=layers, num_heads=heads,
      num_kv_heads=kv_heads, head_dim=_get(config, "head_dim", default=embed // heads),
      mlp_dim=config["intermediate_size"], norm_epsilon=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta,
      rope_scaling=scaling, tie_embeddings=bool(config.get("tie_word_embeddings", False)),
      qkv_bias=family == "qwen2" or (family == "qwen2_moe" and config.get("qkv_bias", True)),
      qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(family),
      sliding_window=window or None, moe_layers=(False,) * layers)
  if family == "olmoe" and config.get("clip_qkv") is not None:
    raise ConversionError(f"olmoe: clip_qkv={config['clip_qkv']} is not supported (only clip_qkv=null)")
  if family not in MOE_FAMILIES:
    return Arch(**common)
  experts = _get(config, "num_local_experts", "num_experts", "n_routed_experts")
  moe = dict(num_experts=experts, experts_per_token=config["num_experts_per_tok"],
             expert_mlp_dim=_get(config, "moe_intermediate_size", default=config["intermediate_size"]),
             renormalize=family == "mixtral" or bool(config.get("norm_topk_prob", False)))
  if family in ("mixtral", "olmoe"):
    if family == "mixtral" and config.get("router_jitter_noise"):
      raise ConversionError(f"mixtral: router_jitter_noise={config['router_jitter_noise']} is a training-time "
                            "option the converter does not carry; set it to 0")
    return Arch(**{**common, "moe_layers": (True,) * layers}, **moe)
  if family in ("qwen2_moe", "qwen3_moe"):
    step, dense_only = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
    flags = tuple(i not in dense_only and experts > 0 and (i + 1) % step == 0 for i in range(layers))
    shared = config.get("shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0
    return Arch(**{**common, "moe_layers": flags}, **moe, shared_mlp_dim=shared, shared_expert_gate=shared > 0,
                moe_every=step)
  # deepseek_v3
  first, every = config.get("first_k_dense_replace", 0), config.get("moe_layer_freq", 1)
  flags = tuple(i >= first and i % every == 0 for i in range(layers))
  if config.get("topk_method", "noaux_tc") != "noaux_tc" or config.get("scoring_func", "sigmoid") != "sigmoid":
    raise ConversionError(f"deepseek_v3: topk_method={config.get('topk_method')!r} / scoring_func="
                          f"{config.get('scoring_func')!r} are not supported (only 'noaux_tc' with 'sigmoid')")
  return Arch(**{**common, "moe_layers": flags, "qk_norm": None, "head_dim": config["qk_rope_head_dim"]}, **moe,
              shared_mlp_dim=moe["expert_mlp_dim"] * (config.get("n_shared_experts") or 0),
              router="sigmoid", routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
              n_group=config.get("n_group") or 1, topk_group=config.get("topk_group") or 1, router_bias=True,
              mla=True, q_lora_rank=config.get("q_lora_rank"), kv_lora_rank=config["kv_lora_rank"],
              qk_nope_head_dim=config["qk_nope_head_dim"], qk_rope_head_dim=config["qk_rope_head_dim"],
              v_head_dim=config["v_head_dim"], rope_interleave=bool(config.get("rope_interleave", True)),
              first_dense_layers=first, moe_every=every, mtp_layers=config.get("num_nextn_predict_layers", 0))


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
      shapes.update({s + "q_proj.weight": (hq, d), s + "k_proj.weight": (hkv, d), s + "v_proj.weight": (hkv, d),
                     s + "o_proj.weight": (d, hq)})
      if a.qkv_bias:
        shapes.update({s + "q_proj.bias": (hq,), s + "k_proj.bias": (hkv,), s + "v_proj.bias": (hkv,)})
      if a.qk_norm == "head":
        shapes.update({s + "q_norm.weight": (a.head_dim,), s + "k_norm.weight": (a.head_dim,)})
      elif a.qk_norm == "full":
        shapes.update({s + "q_norm.weight": (hq,), s + "k_norm.weight": (hkv,)})
    if not a.moe_layers[i]:
      shapes.update({p + "mlp.gate_proj.weight": (a.mlp_dim, d), p + "mlp.up_proj.weight": (a.mlp_dim, d),
                     p + "mlp.down_proj.weight": (d, a.mlp_dim)})
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
      shapes.update({sh + "gate_proj.weight": (fs, d), sh + "up_proj.weight": (fs, d),
                     sh + "down_proj.weight": (d, fs)})
    if a.shared_expert_gate:
      shapes[p + "mlp.shared_expert_gate.weight"] = (1, d)
  return shapes


_IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)


def check_tensors(tensors, arch):
  """Validate the checkpoint's tensors against the config; returns whether experts are stored fused.

  Raises ConversionError naming every missing or unexpected tensor and every shape mismatch (expected vs found).
  Ignored: `rotary_emb.inv_freq` buffers, a tied `lm_head.weight`, and DeepSeek's multi-token-prediction layers
  (`model.layers.{n}` for n >= num_hidden_layers).
  """
  if any(name.endswith("weight_scale_inv") for name in tensors):
    raise ConversionError("the checkpoint holds FP8 block-quantised weights (*.weight_scale_inv); dequantise it to "
                          "bf16 first")
  names = set(tensors)
  for name in list(names):
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if any(p.match(name) for p in _IGNORED) or (name == "lm_head.weight" and arch.tie_embeddings) or (
        m and arch.mtp_layers and int(m.group(1)) >= arch.num_layers):
      names.discard(name)
  fused = any(".experts.gate_up_proj" in n for n in names)
  expected = expected_tensors(arch, fused_experts=fused)
  missing = sorted(set(expected) - names)
  unexpected = sorted(names - set(expected))
  mismatched = [f"{n}: expected {expected[n]}, found {tuple(tensors[n].shape)}" for n in sorted(names & set(expected))
                if tuple(tensors[n].shape) != expected[n]]
  problems = []
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {_clip(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors ({len(unexpected)}): {_clip(unexpected)}")
  if mismatched:
    problems.append(f"shape mismatches ({len(mismatched)}): {_clip(mismatched)}")
  if problems:
    raise ConversionError(f"{arch.family} checkpoint does not match its config.json: " + "; ".join(problems))
  return fused


def _clip(items, limit=8):
  return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ------------------------------------------------------------------------------------------- HF <-> canonical

def _rope_perm(dim):
  """Interleaved pair order (0,1),(2,3).. -> half-split order: [0, 2, 4, .., 1, 3, 5, ..]."""
  return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


def hf_to_canonical(tensors, arch, *, fused_experts=False, dtype=np.float32):
  """Map HF tensors (validated by `check_tensors`) to the canonical layout, cast to `dtype`."""
  a, d = arch, arch.embed_dim

  def t(name):
    return np.asarray(tensors[name]).astype(dtype)

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
      perm = _rope_perm(rope) if a.rope_interleave else np.arange(rope)
      head_perm = np.concatenate([np.arange(a.qk_nope_head_dim), a.qk_nope_head_dim + perm])
      attn = {}
      if a.q_lora_rank is None:
        attn["q"] = lin(s + "q_proj.weight", a.num_heads, qk)[..., head_perm]
      else:
        attn["q_a"] = lin(s + "q_a_proj.weight")
        attn["q_a_norm"] = t(s + "q_a_layernorm.weight")
        attn["q_b"] = lin(s + "q_b_proj.weight", a.num_heads, qk)[..., head_perm]
      kv_a = lin(s + "kv_a_proj_with_mqa.weight")
      attn["kv_a"] = np.concatenate([kv_a[:, :a.kv_lora_rank], kv_a[:, a.kv_lora_rank:][:, perm]], axis=1)
      attn["kv_a_norm"] = t(s + "kv_a_layernorm.weight")
      attn["kv_b"] = lin(s + "kv_b_proj.weight", a.num_heads, a.qk_nope_head_dim + a.v_head_dim)
      attn["o"] = lin(s + "o_proj.weight").reshape(a.num_heads, a.v_head_dim, d)
    else:
      attn = {"q": lin(s + "q_proj.weight", a.num_heads, a.head_dim),
              "k": lin(s + "k_proj.weight", a.num_kv_heads, a.head_dim),
              "v": lin(s + "v_proj.weight", a.num_kv_heads, a.head_dim),
              "o": lin(s + "o_proj.weight").reshape(a.num_heads, a.head_dim, d)}
      if a.qkv_bias:
        attn["q_bias"] = t(s + "q_proj.bias").reshape(a.num_heads, a.head_dim)
        attn["k_bias"] = t(s + "k_proj.bias").reshape(a.num_kv_heads, a.head_dim)
        attn["v_bias"] = t(s + "v_proj.bias").reshape(a.num_kv_heads, a.head_dim)
      if a.qk_norm:
        attn["q_norm"], attn["k_norm"] = t(s + "q_norm.weight"), t(s + "k_norm.weight")
    layer["attn"] = attn
    if not a.moe_layers[i]:
      layer["ffn"] = {"gate": lin(p + "mlp.gate_proj.weight"), "up": lin(p + "mlp.up_proj.weight"),
                      "down": lin(p + "mlp.down_proj.weight")}
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
        ffn["router_bias"] = np.asarray(tensors[p + "mlp.gate.e_score_correction_bias"]).astype(np.float32)
      if a.shared_mlp_dim:
        sh = p + ("mlp.shared_experts." if a.family == "deepseek_v3" else "mlp.shared_expert.")
        ffn.update(shared_gate=lin(sh + "gate_proj.weight"), shared_up=lin(sh + "up_proj.weight"),
                   shared_down=lin(sh + "down_proj.weight"))
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
      inv = np.argsort(_rope_perm(rope)) if a.rope_interleave else np.arange(rope)
      head_inv = np.concatenate([np.arange(a.qk_nope_head_dim), a.qk_nope_head_dim + inv])
      if a.q_lora_rank is None:
        out[s + "q_proj.weight"] = lin(np.asarray(attn["q"])[..., head_inv])
      else:
        out[s + "q_a_proj.weight"] = lin(attn["q_a"])
        out[s + "q_a_layernorm.weight"] = np.asarray(attn["q_a_norm"])
        out[s + "q_b_proj.weight"] = lin(np.asarray(attn["q_b"])[..., head_inv])
      kv_a = np.asarray(attn["kv_a"])
      out[s + "kv_a_proj_with_mqa.weight"] = lin(np.concatenate(
          [kv_a[:, :a.kv_lora_rank], kv_a[:, a.kv_lora_rank:][:, inv]], axis=1))
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
