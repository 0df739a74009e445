"""LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors) <-> zoo LoRA adapters
(`zoo.layers.lora`), for the Hugging Face families the zoo loads (`zoo.checkpoints.hf`).

Names: a PEFT tensor `base_model.model.<HF module>.lora_A.weight` [r, in] / `lora_B.weight` [out, r] belongs to the HF
linear `<HF module>.weight` [out, in]. Which zoo layer that is comes from the two maps the checkpoint conversion
already has, composed: `hf_spec.hf_to_canonical` (HF tensor -> canonical tensor; run on a probe checkpoint of the same
family and layer layout with every size shrunk to 1 and each tensor filled with its own number, so the map costs
nothing for a large model) and `zoo_tree.classify` (zoo parameter path -> canonical tensor). Layout: the canonical
kernel is the HF weight transposed with its input and output axes reshaped (e.g. q: [embed, heads, head_dim]), so the
zoo adapter is `lora_a = A^T` reshaped to [*contracted, r] and `lora_b = B^T` reshaped to [r, *features], and the
adapted kernel `W + (alpha / r) lora_a . lora_b` is the transposed HF `W + (alpha / r) B A`.

Supported: LoRA (`peft_type` LORA) with `alpha / r` scaling on the dense linears of Llama, Qwen2, Qwen3 and the
attention / dense / shared-expert linears of the MoE families, DeepSeek-V3's latent attention included (its query and
kv_a outputs hold interleaved RoPE features that the zoo keeps half-split: B's rows are permuted as the weight's,
`output_order`); refused with the key named: DoRA, rsLoRA, per-module ranks or alphas, LoRA biases,
`modules_to_save`, parameter-level targets (experts), and an adapter whose base or rank does not fit the model.
"""

import dataclasses
import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from zoo.checkpoints import hf_spec, safetensors_io, zoo_tree
from zoo.checkpoints.hf_spec import ConversionError
from zoo.layers.lora import EXPERT_SUFFIX, TASK_EMBEDDINGS, LoRASpec, adapted_modules, split_adapters, stack_experts

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# adapter_config.json keys whose non-neutral values change the adapter's math or add parameters the zoo does not have.
_UNSUPPORTED = {
  "use_dora": "DoRA (weight-decomposed LoRA)",
  "use_rslora": "rank-stabilised LoRA (alpha / sqrt(r) scaling)",
  "lora_bias": "LoRA biases",
  "use_qalora": "QA-LoRA",
  "use_bdlora": "BD-LoRA",
  "alora_invocation_tokens": "activated LoRA",
  "layer_replication": "layer replication",
  "rank_pattern": "per-module ranks",
  "alpha_pattern": "per-module alphas",
  "target_parameters": "parameter-level targets (expert weights)",
  "modules_to_save": "fully trained modules (modules_to_save)",
  "trainable_token_indices": "trained token embeddings",
  "fan_in_fan_out": "fan_in_fan_out (Conv1D weights)",
  "arrow_config": "Arrow routing",
  "monteclora_config": "MonteCLoRA",
}


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
  """A PEFT LoRA adapter read from its directory: its path, adapter_config.json and tensors {HF module: (A, B)}
  with A [r, in] and B [out, r] (numpy)."""

  path: str
  config: dict
  modules: dict

  @property
  def r(self):
    return int(self.config["r"])

  @property
  def alpha(self):
    return float(self.config["lora_alpha"])

  @property
  def base_model_name_or_path(self):
    return self.config.get("base_model_name_or_path") or ""


def read_adapter(path):
  """Read and check a PEFT LoRA adapter directory.

  Raises:
    ConversionError naming the file, key or tensor: a missing or malformed file; a `peft_type` other than LORA; an
      option the zoo does not support (DoRA, rsLoRA, ...); a tensor that is not a lora_A / lora_B weight; a module
      with only one of them; a rank that differs from `r`.
  """
  path = path[5:] if str(path).startswith("peft:") else str(path)
  if not os.path.isdir(path):
    raise ConversionError(f"PEFT adapter {path}: no such directory")
  config_path = os.path.join(path, CONFIG_FILE)
  try:
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
  except FileNotFoundError:
    raise ConversionError(f"PEFT adapter {path} has no {CONFIG_FILE}") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"{config_path}: not valid JSON ({e})") from None
  if not isinstance(config, dict):
    raise ConversionError(f"{config_path}: a JSON {type(config).__name__}, not an object of settings")
  kind = config.get("peft_type")
  if kind != "LORA":
    raise ConversionError(f"{config_path}: peft_type={kind!r} is not supported; allowed: 'LORA'")
  for key, what in _UNSUPPORTED.items():
    if config.get(key):
      raise ConversionError(f"{config_path}: {key}={config[key]!r}: {what} is not supported; allowed: plain LoRA")
  if config.get("bias", "none") != "none":
    raise ConversionError(f"{config_path}: bias={config['bias']!r} is not supported; allowed: 'none'")
  for key in ("r", "lora_alpha"):
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (key == "r" and value % 1):
      raise ConversionError(f"{config_path}: {key}={value!r} is invalid; allowed: a positive number")
  weights = os.path.join(path, WEIGHTS_FILE)
  if not os.path.isfile(weights):
    raise ConversionError(f"PEFT adapter {path} has no {WEIGHTS_FILE} (pickled adapter_model.bin is never read)")
  tensors = safetensors_io.load_file(weights)
  parts = {}
  for name in tensors:
    m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
    if m is None:
      raise ConversionError(
        f"{weights}: tensor {name!r} is not a LoRA weight ({PREFIX}<module>.lora_A.weight / .lora_B.weight)"
      )
    parts.setdefault(m.group(1), {})[m.group(2)] = np.asarray(tensors[name], np.float32)
  modules = {}
  r = int(config["r"])
  for module, ab in sorted(parts.items()):
    if set(ab) != {"A", "B"}:
      raise ConversionError(f"{weights}: module {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
    a, b = ab["A"], ab["B"]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
      raise ConversionError(
        f"{weights}: module {module} has lora_A {a.shape} and lora_B {b.shape}; adapter_config.json gives r={r} "
        "(expected lora_A [r, in] and lora_B [out, r])"
      )
    modules[module] = (a, b)
  if not modules:
    raise ConversionError(f"{weights} holds no LoRA weights")
  return PeftAdapter(path, config, modules)


def _probe_arch(arch):
  """`arch` with every width 1 (MLA's RoPE width 2): the same tensor names, tiny tensors."""
  mla = {}
  if arch.mla:
    mla = dict(
      q_lora_rank=None if arch.q_lora_rank is None else 1,
      kv_lora_rank=1,
      qk_nope_head_dim=1,
      qk_rope_head_dim=2,
      v_head_dim=1,
    )
  return dataclasses.replace(
    arch,
    vocab_size=1,
    embed_dim=1,
    head_dim=1,
    mlp_dim=1,
    expert_mlp_dim=min(arch.expert_mlp_dim, 1),
    shared_mlp_dim=min(arch.shared_mlp_dim, 1),
    **mla,
  )


def output_order(arch, module):
  """The HF output features of `module` in the zoo's order (an index array), or None when they are the same: MLA's
  query and kv_a projections hold RoPE features that the zoo keeps half-split, not in DeepSeek's interleaved pairs
  (`hf_spec.hf_to_canonical`); an adapter's B rows are permuted as the weight's rows are."""
  if not arch.mla or not module.endswith(("self_attn.q_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa")):
    return None
  rope = arch.qk_rope_head_dim
  perm = hf_spec.rope_order(rope) if arch.rope_interleave else np.arange(rope)
  if module.endswith("kv_a_proj_with_mqa"):
    return np.concatenate([np.arange(arch.kv_lora_rank), arch.kv_lora_rank + perm])
  qk = arch.qk_nope_head_dim + rope
  head = np.concatenate([np.arange(arch.qk_nope_head_dim), arch.qk_nope_head_dim + perm])
  return np.concatenate([h * qk + head for h in range(arch.num_heads)])


def module_names(arch):
  """{(layer, group, canonical name): HF module name} for every HF linear weight that is one canonical kernel (the
  stacked experts, made of several HF tensors, are left out)."""
  probe_arch = _probe_arch(arch)
  shapes = hf_spec.expected_tensors(probe_arch)
  names = sorted(shapes)
  probe = {n: np.full(shapes[n], i + 1, np.float32) for i, n in enumerate(names)}
  canon = hf_spec.hf_to_canonical(probe, probe_arch)
  out = {}

  def visit(key, value):
    ids = np.unique(np.asarray(value))
    name = names[int(ids[0]) - 1] if ids.size == 1 else ""
    if name.endswith(".weight") and len(shapes[name]) == 2 and np.ndim(value) >= 2:
      out[key] = name[: -len(".weight")]

  for key, value in canon.items():
    if key != "layers":
      visit((None, None, key), value)
  for i, layer in enumerate(canon["layers"]):
    for group, item in layer.items():
      if isinstance(item, dict):
        for key, value in item.items():
          visit((i, group, key), value)
  return out


def zoo_modules(params, arch):
  """{HF module name: zoo module path} of the model's `DenseGeneral` layers (found by their kernels or adapters) that
  have an HF linear counterpart."""
  names = module_names(arch)
  out = {}
  for path in traverse_util.flatten_dict(nn.unbox(params)):
    if path[-1] not in ("kernel", "lora_a"):  # a kernel, or an adapter given without its base
      continue
    try:
      key = zoo_tree.classify(("params", *path[:-1], "kernel"))
    except ConversionError:
      continue
    if key in names:
      out[names[key]] = "/".join(path[:-1])
  return out


def adapter_spec(adapter, params, arch, *, dropout=None):
  """The LoRASpec that adapts exactly the adapter's modules: its rank and alpha, each module's zoo path anchored.

  Args:
    adapter: a `PeftAdapter`.
    params: the base model's params (or ShapeDtypeStructs).
    arch: the base's `hf_spec.Arch` (its family and layer layout name the modules).
    dropout: the adapter dropout (default: the adapter's `lora_dropout`).
  """
  paths = _zoo_paths(adapter, params, arch)
  rate = float(adapter.config.get("lora_dropout") or 0.0) if dropout is None else dropout
  r = adapter.r
  alpha = adapter.alpha
  return LoRASpec(
    r=r, alpha=alpha, dropout=rate, target_modules=tuple(f"^{re.escape(p)}$" for p in sorted(paths.values()))
  )


def _zoo_paths(adapter, params, arch):
  known = zoo_modules(params, arch)
  paths = {}
  for module in adapter.modules:
    if module not in known:
      raise ConversionError(
        f"PEFT adapter {adapter.path}: module {module} has no counterpart in the {arch.family} base model "
        f"(base_model_name_or_path={adapter.base_model_name_or_path!r}); adaptable modules look like "
        f"{sorted(known)[:4]}"
      )
    paths[module] = known[module]
  return paths


def adapter_params(adapter, params, arch):
  """The adapter as zoo adapter leaves: {'params': nested dict with `lora_a` / `lora_b` at the adapted modules}.

  Args:
    adapter: a `PeftAdapter`.
    params: the adapted model's params (arrays or ShapeDtypeStructs, boxed or not): they give every adapter's shape.
    arch: the base's `hf_spec.Arch`.

  Raises:
    ConversionError naming the module: one the model does not adapt, or whose shapes do not fit (another base model
      or another rank).
  """
  flat = traverse_util.flatten_dict(nn.unbox(params))
  out = {}
  for module, path in _zoo_paths(adapter, params, arch).items():
    key = tuple(path.split("/"))
    if (*key, "lora_a") not in flat:
      raise ConversionError(
        f"PEFT adapter {adapter.path}: module {module} ({path}) is not adapted by the model; adapted: "
        f"{adapted_modules(params)[:6]}"
      )
    a_shape, b_shape = tuple(flat[(*key, "lora_a")].shape), tuple(flat[(*key, "lora_b")].shape)
    a, b = adapter.modules[module]
    if a_shape[-1] != a.shape[0]:
      raise ConversionError(
        f"PEFT adapter {adapter.path}: rank r={a.shape[0]} of module {module} does not match the model's adapters "
        f"(r={a_shape[-1]})"
      )
    if a.shape[1] != int(np.prod(a_shape[:-1])) or b.shape[0] != int(np.prod(b_shape[1:])):
      raise ConversionError(
        f"PEFT adapter {adapter.path}: module {module} has lora_A {a.shape} and lora_B {b.shape}, but the model's "
        f"{path} maps {int(np.prod(a_shape[:-1]))} inputs to {int(np.prod(b_shape[1:]))} outputs; the adapter "
        f"belongs to another base model (base_model_name_or_path={adapter.base_model_name_or_path!r})"
      )
    order = output_order(arch, module)
    out[(*key, "lora_a")] = a.T.reshape(a_shape)
    out[(*key, "lora_b")] = (b.T if order is None else b.T[:, order]).reshape(b_shape)
  return {"params": traverse_util.unflatten_dict(out)}


MIXTURE_FILE = "mixture.json"  # a mixture's routing: router kind, top_k, experts, the expert directories
ROUTER_FILE = "router.safetensors"  # a mixture's routers: '<HF module>.lora_router.weight' [E, in]


def export_adapter(params, spec, arch, out_dir, *, base_model_name_or_path="", overwrite=False, sources=()):
  """Write the adapters of `params` as a PEFT LoRA adapter directory (loadable with `peft.PeftModel.from_pretrained`).

  A mixture of LoRA experts (`spec.experts` = E) is written as E PEFT adapters, `expert_<e>/` (each loadable on its
  own: that expert alone, weight 1), beside `router.safetensors` (every adapted module's router,
  '<HF module>.lora_router.weight' [E, in] as torch Linear weights; GLIDER's task embeddings [E, embed]) and
  `mixture.json` (router, top_k, experts); `config.lora.adapter` reads it back into a mixture (`mixture_params`).

  Args:
    params: the adapted model's params, or only its adapters (`zoo.layers.lora.split_adapters`); the adapters are
      written, the base is not.
    spec: the model's LoRASpec (rank, alpha, dropout).
    arch: the base's `hf_spec.Arch` (its family and layer layout name the modules).
    out_dir: the directory to create, written whole (`zoo.checkpoints.write_dir`).
    base_model_name_or_path: recorded in adapter_config.json.
    overwrite: replace a non-empty `out_dir` whole.
    sources: the inputs (base model, checkpoint), which `out_dir` may not be, lie in or contain.

  Returns:
    The adapter_config.json dict (of every expert, for a mixture).

  Raises:
    ConversionError: extra trained base parameters (`spec.trainable_params`), which a LoRA adapter cannot hold, or
      an adapted layer without a Hugging Face counterpart (named).
  """
  from zoo.checkpoints.hf import write_dir  # pylint: disable=g-import-not-at-top  (hf imports the model registry)

  if spec.trainable_params:
    raise ConversionError(
      f"config.lora.trainable_params={list(spec.trainable_params)}: the base parameters trained beside the adapters "
      "cannot be written into a PEFT LoRA adapter; allowed: adapters only"
    )
  _, adapters = split_adapters(nn.unbox(params))
  flat = traverse_util.flatten_dict(adapters)
  hf_names = {path: module for module, path in zoo_modules(params, arch).items()}
  modules = {}
  for path in adapted_modules(params):
    if path.endswith(EXPERT_SUFFIX):
      raise ConversionError(
        f"adapted weight {path[: -len(EXPERT_SUFFIX)]} is a MoE's stacked expert weight: LoRA on expert weights "
        "(PEFT's target_parameters) is not written to PEFT; allowed: adapters on the attention and dense FFN layers"
      )
    if path not in hf_names:
      raise ConversionError(f"adapted layer {path} has no Hugging Face counterpart in a {arch.family} model")
    modules[hf_names[path]] = tuple(path.split("/"))
  leaf = lambda key, name: np.asarray(flat[(*key, name)], np.float32)

  def hf_b(module, b):  # lora_b [r, *out] with its output features in the HF order
    order = output_order(arch, module)
    return b if order is None else b.reshape(spec.r, -1)[:, np.argsort(order)]

  if not spec.experts:
    experts = [{m: (leaf(k, "lora_a"), hf_b(m, leaf(k, "lora_b"))) for m, k in modules.items()}]
  else:
    experts = [
      {m: (leaf(k, "lora_a")[e], hf_b(m, leaf(k, "lora_b")[e])) for m, k in modules.items()}
      for e in range(spec.experts)
    ]
  files = [_peft_files(expert, spec, hf_names, base_model_name_or_path) for expert in experts]
  config = files[0][1]

  def write(directory):
    for e, (tensors, cfg) in enumerate(files):
      sub = os.path.join(directory, f"expert_{e}") if spec.experts else directory
      os.makedirs(sub, exist_ok=True)
      safetensors_io.save_file(tensors, os.path.join(sub, WEIGHTS_FILE), metadata={"format": "pt"})
      with open(os.path.join(sub, CONFIG_FILE), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    if spec.experts:
      routers = {
        f"{PREFIX}{m}.lora_router.weight": np.ascontiguousarray(leaf(k, "lora_router").reshape(-1, spec.experts).T)
        for m, k in modules.items()
      }
      if (TASK_EMBEDDINGS,) in flat:  # GLIDER's experts' task embeddings [E, embed]
        routers[TASK_EMBEDDINGS] = np.ascontiguousarray(leaf((), TASK_EMBEDDINGS))
      safetensors_io.save_file(routers, os.path.join(directory, ROUTER_FILE), metadata={"format": "pt"})
      mixture = {
        "experts": spec.experts,
        "router": spec.router,
        "top_k": spec.top_k,
        "expert_dirs": [f"expert_{e}" for e in range(spec.experts)],
        "scaling": spec.scale,
        **({"glider_scale": spec.glider_scale} if spec.router == "glider" else {}),
      }
      with open(os.path.join(directory, MIXTURE_FILE), "w") as f:
        json.dump(mixture, f, indent=2, sort_keys=True)

  write_dir(out_dir, write, overwrite=overwrite, sources=sources)
  return config


def _peft_files(expert, spec, hf_names, base_model_name_or_path):
  """(tensors, adapter_config.json dict) of one adapter; `expert`: {HF module: (lora_a [*in, r], lora_b [r, *out])}."""
  tensors = {}
  for module, (a, b) in expert.items():
    tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, spec.r).T)
    tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.reshape(spec.r, -1).T)
  modules = list(expert)
  # Short names (q_proj) when every module of those names is adapted, else the full module names.
  short = sorted({m.rsplit(".", 1)[-1] for m in modules})
  every = sorted(m for m in hf_names.values() if m.rsplit(".", 1)[-1] in short)
  config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model_name_or_path,
    "r": spec.r,
    "lora_alpha": spec.alpha,
    "lora_dropout": spec.dropout,
    "target_modules": short if every == sorted(modules) else sorted(modules),
    "bias": "none",
    "fan_in_fan_out": False,
    "use_dora": False,
    "use_rslora": False,
    "init_lora_weights": True,
    "inference_mode": True,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
  }
  return tensors, config


def base_arch(source):
  """The `hf_spec.Arch` of a Hugging Face model directory ('hf:DIR' or DIR), from config.json and headers only."""
  return hf_spec.check_dir(source).arch


def load_for_model(path, spec, params, base=""):
  """The variables of the PEFT adapter `path` for a model adapted by `spec` (`config.lora.adapter`).

  Args:
    path: the adapter directory.
    spec: the model's LoRASpec (`config.lora`): its rank and alpha must be the adapter's, and it must adapt every
      module the adapter has (modules it adapts beyond them keep their zero-initialised `lora_b`).
    params: the adapted model's params (ShapeDtypeStructs or arrays).
    base: the model's `config.init_from` ('hf:DIR' names the Hugging Face family and layout; else the adapter's
      `base_model_name_or_path` must be a local Hugging Face directory).

  Returns:
    {'params': the adapter leaves}.

  Raises:
    ConversionError / ConfigError naming the key or module that does not match.
  """
  from zoo.registry import ConfigError  # pylint: disable=g-import-not-at-top

  mixture = _read_mixture(path, spec)
  adapter = read_adapter(os.path.join(path, mixture["expert_dirs"][0]) if mixture else path)
  if not base:
    raise ConfigError(
      f"config.lora.adapter={path!r} adapts a trained base model: set config.init_from to it ('hf:DIR' or a zoo "
      "checkpoint)"
    )
  source = base if str(base).startswith("hf:") else adapter.base_model_name_or_path
  if not source or not os.path.isfile(os.path.join(source[3:] if source.startswith("hf:") else source, "config.json")):
    raise ConfigError(
      f"config.lora.adapter={path!r}: the Hugging Face family of the base model is unknown (config.init_from="
      f"{base!r}, the adapter's base_model_name_or_path={adapter.base_model_name_or_path!r}); allowed: "
      "config.init_from='hf:DIR', or an adapter whose base_model_name_or_path is a local Hugging Face directory"
    )
  for key, ours, theirs in (("r", spec.r, adapter.r), ("alpha", spec.alpha, adapter.alpha)):
    if float(ours) != float(theirs):
      raise ConfigError(
        f"config.lora.{key}={ours!r} does not match the adapter {path} ({'lora_alpha' if key == 'alpha' else 'r'}="
        f"{theirs!r} in its {CONFIG_FILE}); set config.lora.{key}={theirs!r}"
      )
  if mixture:
    return mixture_params(path, mixture, spec, params, base_arch(source))
  return adapter_params(adapter, params, base_arch(source))


def _read_mixture(path, spec):
  """The mixture.json of a mixture export at `path` (checked against `spec`), or None for a single adapter."""
  from zoo.registry import ConfigError  # pylint: disable=g-import-not-at-top

  file = os.path.join(path, MIXTURE_FILE)
  if not os.path.isfile(file):
    if spec.experts:
      raise ConfigError(
        f"config.lora.experts={spec.experts}: {path} is a single PEFT adapter (no {MIXTURE_FILE}); allowed: a "
        "mixture written by tools/convert_hf.py lora-to-peft, or config.lora.experts=0"
      )
    return None
  try:
    with open(file) as f:
      mixture = json.load(f)
    experts, dirs = int(mixture["experts"]), list(mixture["expert_dirs"])
  except (ValueError, KeyError, TypeError) as e:
    raise ConversionError(f"{file}: not a mixture description ({type(e).__name__}: {e})") from None
  for key, ours, theirs in (("experts", spec.experts, experts), ("router", spec.router, mixture.get("router"))):
    if ours != theirs:
      raise ConfigError(f"config.lora.{key}={ours!r} does not match the mixture {path} ({key}={theirs!r} in {file})")
  if len(dirs) != experts:
    raise ConversionError(f"{file}: {len(dirs)} expert_dirs for experts={experts}")
  return mixture


def mixture_params(path, mixture, spec, params, arch):
  """The variables of a mixture export (`export_adapter` with experts): each `expert_<e>/` PEFT adapter stacked into
  the experts, the routers from router.safetensors (and GLIDER's task embeddings).

  Raises:
    ConfigError / ConversionError naming the expert, module or tensor that does not fit.
  """
  from zoo.registry import ConfigError  # pylint: disable=g-import-not-at-top

  flat = traverse_util.flatten_dict(nn.unbox(params))
  single = {  # one expert's shapes: the mixture's without the expert axis
    p: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) if p[-1] in ("lora_a", "lora_b") else v for p, v in flat.items()
  }
  single = traverse_util.unflatten_dict(single)
  trees = []
  for e, sub in enumerate(mixture["expert_dirs"]):
    adapter = read_adapter(os.path.join(path, sub))
    for key, ours, theirs in (("r", spec.r, adapter.r), ("alpha", spec.alpha, adapter.alpha)):
      if float(ours) != float(theirs):
        raise ConfigError(f"config.lora.{key}={ours!r} does not match expert {e} of {path} ({key}={theirs!r})")
    trees.append(adapter_params(adapter, single, arch)["params"])
  out = traverse_util.flatten_dict(stack_experts(trees))
  router_file = os.path.join(path, ROUTER_FILE)
  if not os.path.isfile(router_file):
    raise ConversionError(f"mixture {path} has no {ROUTER_FILE}")
  routers = safetensors_io.load_file(router_file)
  for module, zoo_path in _zoo_paths(read_adapter(os.path.join(path, mixture["expert_dirs"][0])), params, arch).items():
    key = (*zoo_path.split("/"), "lora_router")
    name = f"{PREFIX}{module}.lora_router.weight"
    if name not in routers:
      raise ConversionError(f"{router_file} has no router {name}")
    w = np.asarray(routers[name], np.float32)
    if w.shape != (spec.experts, int(np.prod(flat[key].shape[:-1]))):
      raise ConversionError(f"{router_file}: {name} has shape {w.shape}, the model's router {flat[key].shape}")
    out[key] = w.T.reshape(flat[key].shape)
  if (TASK_EMBEDDINGS,) in flat:
    if TASK_EMBEDDINGS not in routers:
      raise ConversionError(f"{router_file} has no {TASK_EMBEDDINGS} (GLIDER's experts' task embeddings)")
    out[(TASK_EMBEDDINGS,)] = np.asarray(routers[TASK_EMBEDDINGS], np.float32).reshape(flat[(TASK_EMBEDDINGS,)].shape)
  return {"params": traverse_util.unflatten_dict(out)}
