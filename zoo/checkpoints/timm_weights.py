"""timm LowFormer state dicts <-> zoo `lowformer` variables (`zoo/models/lowformer.py`).

A timm state dict (`timm.create_model('lowformer_b0').state_dict()`, or the `model.safetensors` timm's Hugging Face
repositories ship) maps names such as `stages.2.1.attn.main.1.pwise.weight` to torch tensors (or numpy arrays). The
conversion is strict: every tensor of the checkpoint lands in the zoo tree and every zoo leaf comes from one; a missing
or unexpected key, or a shape that differs, is a one-line `ConversionError` naming it, and a checkpoint of another
architecture (e.g. lowformer_b1 weights for a lowformer_b0 model) is one error naming both (the architectures are read
from the tensor names and shapes: widths, depths, head widths and branches).

Layouts (zoo leaf <- timm tensor):
- kxk convolutions (stem, FusedMBConv, depthwise, Lowtention's downsampling) HWIO <- OIHW;
- 1x1 convolutions (stored as DenseGeneral kernels) [C_in, C_out] <- [C_out, C_in, 1, 1]; Linear [in, out] <- [out, in];
- Lowtention's upsampling: timm's ConvTranspose2d weight [in, out / groups, k, k] becomes the equivalent forward
  convolution's kernel [k, k, in / groups, out], spatially flipped (groups = out when the model has an output
  projection `o_proj`, i.e. the depthwise upsampling, else 1);
- BatchNorm weight/bias -> params scale/bias, running_mean/var -> batch_stats mean/var; `num_batches_tracked` is read
  and dropped (written as 0 by `zoo_to_timm`); GroupNorm/LayerNorm weight/bias -> scale/bias.
"""

import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from zoo.checkpoints.hf_spec import ConversionError

# Zoo module name -> timm module path (relative to the parent's timm path).
_CHILD = {
  "stem_conv": "stem.0.conv",
  "stem_bn": "stem.0.norm",
  "head_conv": "in_conv.conv",
  "head_bn": "in_conv.norm",
  "pre_logits": "pre_classifier.0",
  "pre_logits_norm": "pre_classifier.1",
  "classifier": "classifier",
  "spatial_conv": "spatial_conv.conv",
  "spatial_bn": "spatial_conv.norm",
  "point_conv": "point_conv.conv",
  "point_bn": "point_conv.norm",
  "inverted_conv": "inverted_conv.conv",
  "depth_conv": "depth_conv.conv",
  "conv_proj": "conv_proj.conv",
  "conv_proj_bn": "conv_proj.norm",
  "qkv": "pwise",
  "o_proj": "o_proj",
  "upsample": "upsampling",
  "attn_norm": "attn.main.0",
  "mlp_norm": "mlp.main.0",
  "mlp_fc1": "mlp.main.1",
  "mlp_fc2": "mlp.main.3",
  "local": "local.main",
}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean", "var": "running_var"}
# How a zoo module's kernel is laid out.
_CONV = {"stem_conv", "spatial_conv", "depth_conv", "conv_proj"}
_DENSE_1X1 = {"point_conv", "inverted_conv", "qkv", "o_proj", "mlp_fc1", "mlp_fc2", "head_conv"}
_LINEAR = {"pre_logits", "classifier"}
_BATCH_NORMS = {"stem_bn", "spatial_bn", "point_bn", "conv_proj_bn", "head_bn"}
_TRACKED = "num_batches_tracked"

Entry = collections.namedtuple("Entry", ["zoo", "timm", "kind", "groups", "torch_shape", "zoo_shape", "dtype"])
Entry.__doc__ = "One leaf: zoo path tuple (collection first), timm key, layout kind, conv groups, both shapes, dtype."


def _timm_module(path, modules):
  """The timm module path of the zoo module `path` (a tuple of names); `modules`: every zoo module path."""
  parts = []
  for depth, name in enumerate(path):
    here = path[: depth + 1]
    if m := re.fullmatch(r"stem_block(\d+)", name):
      parts.append(f"stem.{int(m.group(1)) + 1}.main")
    elif m := re.fullmatch(r"stage(\d+)_block(\d+)", name):
      lowformer_block = (*here, "local") in modules
      parts.append(f"stages.{int(m.group(1)) - 1}.{m.group(2)}" + ("" if lowformer_block else ".main"))
    elif name == "attn":
      parts.append("attn.main.1" if (*path[:depth], "attn_norm") in modules else "attn.main")
    elif name in _CHILD:
      parts.append(_CHILD[name])
    else:
      raise ConversionError(f"zoo module {'/'.join(path)} has no timm LowFormer counterpart ({name!r})")
  return ".".join(parts)


def _kind(module, leaf):
  if leaf != "kernel":
    return "vector"
  if module in _CONV:
    return "conv"
  if module in _DENSE_1X1:
    return "dense1x1"
  if module in _LINEAR:
    return "linear"
  if module == "upsample":
    return "upsample"
  raise ConversionError(f"zoo kernel of {module!r} has no timm layout")


def _torch_shape(kind, shape, groups):
  if kind == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  if kind == "dense1x1":
    return (shape[1], shape[0], 1, 1)
  if kind == "linear":
    return (shape[1], shape[0])
  if kind == "upsample":
    return (shape[2] * groups, shape[3] // groups, shape[0], shape[1])
  return tuple(shape)


def _to_zoo(kind, value, groups):
  """A timm tensor (numpy) in the zoo layout."""
  if kind == "conv":
    return value.transpose(2, 3, 1, 0)
  if kind == "dense1x1":
    return value[:, :, 0, 0].T
  if kind == "linear":
    return value.T
  if kind == "upsample":
    c_in, out_per_group, k1, k2 = value.shape
    w = value.reshape(groups, c_in // groups, out_per_group, k1, k2)[..., ::-1, ::-1]
    return w.transpose(3, 4, 1, 0, 2).reshape(k1, k2, c_in // groups, groups * out_per_group)
  return value


def _to_timm(kind, value, groups):
  """A zoo leaf (numpy) in the timm layout."""
  if kind == "conv":
    return value.transpose(3, 2, 0, 1)
  if kind == "dense1x1":
    return value.T[:, :, None, None]
  if kind == "linear":
    return value.T
  if kind == "upsample":
    k1, k2, in_per_group, c_out = value.shape
    w = value.reshape(k1, k2, in_per_group, groups, c_out // groups).transpose(3, 2, 4, 0, 1)[..., ::-1, ::-1]
    return w.reshape(groups * in_per_group, c_out // groups, k1, k2)
  return value


def _variables_of(target):
  """{collection: tree} of abstract or concrete variables (unboxed) of a LowFormer module or a variables tree."""
  if isinstance(target, nn.Module):
    image = jax.ShapeDtypeStruct((1, 8, 8, target.in_channels), jnp.float32)
    target = jax.eval_shape(target.init, jax.random.key(0), image)
  return {k: nn.meta.unbox(v) for k, v in dict(target).items() if k in ("params", "batch_stats")}


def plan(target):
  """The conversion plan of a zoo LowFormer tree: one `Entry` per leaf, in the tree's order.

  Args:
    target: a `LowFormer` module, or its variables ({'params', 'batch_stats'}: arrays or ShapeDtypeStructs).
  """
  flat = traverse_util.flatten_dict(_variables_of(target))
  modules = {key[1:i] for key in flat for i in range(2, len(key))}
  entries = []
  for key, leaf in flat.items():
    path, name = key[1:-1], key[-1]
    if name not in _LEAF or not path:
      raise ConversionError(f"zoo leaf {'/'.join(key)} has no timm LowFormer counterpart")
    kind = _kind(path[-1], name)
    groups = 1
    if kind == "upsample" and (*path[:-1], "o_proj") in modules:
      groups = leaf.shape[3]  # without the fused output projection the upsampling is depthwise
    timm_key = f"{_timm_module(path, modules)}.{_LEAF[name]}"
    shape = tuple(leaf.shape)
    entries.append(Entry(key, timm_key, kind, groups, _torch_shape(kind, shape, groups), shape, leaf.dtype))
  return entries


def _numpy(value):
  """A torch tensor or array-like as a numpy array (bfloat16 torch tensors as float32)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _shape(state_dict, key):
  """The shape of `state_dict[key]` without reading it where the mapping can say (`safetensors_io.Tensors`)."""
  if hasattr(state_dict, "info"):
    return tuple(state_dict.info(key).shape)
  value = state_dict[key]
  return tuple(value.shape) if hasattr(value, "shape") else tuple(np.shape(value))


def architecture(shapes):
  """What a timm LowFormer state dict's names and shapes say about its architecture.

  Args:
    shapes: {timm key: shape}.

  Returns:
    dict: in_channels, num_classes, widths (5), depths (5), head_widths, attention, mlp, fused_conv.

  Raises:
    ConversionError: a key the architecture is read from is missing.
  """

  def shape(key):
    if key not in shapes:
      raise ConversionError(f"not a timm LowFormer state dict: it has no {key!r}")
    return tuple(shapes[key])

  stem = shape("stem.0.conv.weight")
  widths, depths = [stem[0]], [len({k.split(".")[1] for k in shapes if re.match(r"stem\.\d+\.main\.", k)})]
  fused = None
  for s in range(4):
    blocks = sorted({int(k.split(".")[2]) for k in shapes if re.match(rf"stages\.{s}\.\d+\.", k)})
    depths.append(max(0, len(blocks) - (1 if s >= 2 else 0)))
    width = widths[-1]
    if blocks:
      width = shape(f"stages.{s}.0.main.point_conv.conv.weight")[0]
      fused = f"stages.{s}.0.main.spatial_conv.conv.weight" in shapes if fused is None else fused
    widths.append(width)
  return dict(
    in_channels=stem[1],
    num_classes=shape("classifier.weight")[0],
    widths=tuple(widths),
    depths=tuple(depths),
    head_widths=(shape("in_conv.conv.weight")[0], shape("pre_classifier.0.weight")[0]),
    attention=any(".attn." in k for k in shapes),
    mlp=any(".mlp." in k for k in shapes),
    fused_conv=bool(fused) if fused is not None else True,
  )


_ARCH_KEYS = ("widths", "depths", "head_widths", "attention", "mlp", "fused_conv")


def variant_of(arch):
  """The timm variant name ('lowformer_b0', ...) whose architecture `arch` (see `architecture`) is, or None."""
  from zoo.models.lowformer import VARIANTS  # pylint: disable=import-outside-toplevel

  for variant, table in VARIANTS.items():
    same = all(arch[k] == (tuple(v) if isinstance(v, (tuple, list)) else v) for k, v in table.items() if k in arch)
    if same and arch["fused_conv"]:
      return f"lowformer_{variant}"
  return None


def describe(arch, *, shaped=False):
  """'lowformer_b0 (widths 16/32/64/128/256, depths 0/1/1/3/4, ...)' (with `shaped`: 'lowformer_b0-shaped (...)'),
  or 'a custom LowFormer (...)'."""

  def join(values):
    return "/".join(map(str, values))

  name = variant_of(arch)
  name = (name + ("-shaped" if shaped else "")) if name else "a custom LowFormer"
  return (
    f"{name} (widths {join(arch['widths'])}, depths {join(arch['depths'])}, head {join(arch['head_widths'])}, "
    f"attention {'on' if arch['attention'] else 'off'}, mlp {'on' if arch['mlp'] else 'off'}, "
    f"{'fused' if arch['fused_conv'] else 'unfused'} convs)"
  )


def timm_to_zoo(state_dict, target, *, source="the checkpoint"):
  """A timm LowFormer state dict as zoo variables {'params': ..., 'batch_stats': ...} of numpy arrays.

  Args:
    state_dict: {timm key: torch tensor or numpy array}.
    target: the zoo `LowFormer` module, or its variables (arrays or ShapeDtypeStructs) to fill.
    source: how errors name the checkpoint (e.g. its file).

  Raises:
    ConversionError: another architecture (both named), other classes or input channels, a missing or unexpected
      key, or a shape that differs (named).
  """
  entries = plan(target)
  have = {k: _shape(state_dict, k) for k in state_dict}
  want = {e.timm: e.torch_shape for e in entries}
  ckpt_arch = architecture(have)
  model_arch = architecture(want)
  if any(ckpt_arch[k] != model_arch[k] for k in _ARCH_KEYS):
    raise ConversionError(f"{source} is {describe(ckpt_arch, shaped=True)}, the model is {describe(model_arch)}")
  for key in ("num_classes", "in_channels"):
    if ckpt_arch[key] != model_arch[key]:
      raise ConversionError(f"{source} has {key}={ckpt_arch[key]}, the model config.model.{key}={model_arch[key]}")
  missing = [k for k in want if k not in have]
  if missing:
    raise ConversionError(
      f"{source} lacks {missing[0]!r} (shape {want[missing[0]]})"
      + (f" and {len(missing) - 1} more keys" if len(missing) > 1 else "")
    )
  tracked = {e.timm.rsplit(".", 1)[0] + "." + _TRACKED for e in entries if e.zoo[-2] in _BATCH_NORMS}
  unexpected = [k for k in have if k not in want and k not in tracked]
  if unexpected:
    raise ConversionError(
      f"{source} holds {unexpected[0]!r} (shape {have[unexpected[0]]}), which a LowFormer of this architecture "
      "does not have" + (f" (and {len(unexpected) - 1} more unexpected keys)" if len(unexpected) > 1 else "")
    )
  flat = {}
  for e in entries:
    if have[e.timm] != e.torch_shape:
      raise ConversionError(f"{source}: {e.timm!r} has shape {have[e.timm]}, the model needs {e.torch_shape}")
    value = _to_zoo(e.kind, _numpy(state_dict[e.timm]), e.groups)
    flat[e.zoo] = np.array(value, dtype=np.dtype(e.dtype), order="C", copy=True)  # never aliases torch's storage
  return traverse_util.unflatten_dict(flat)


def zoo_to_timm(variables):
  """Zoo LowFormer variables ({'params', 'batch_stats'}) as a timm state dict {key: numpy array} (float32 tensors in
  the zoo's dtype; every BatchNorm's `num_batches_tracked` 0, int64)."""
  entries = plan(variables)
  flat = traverse_util.flatten_dict(_variables_of(variables))
  out = {}
  for e in entries:
    out[e.timm] = np.array(_to_timm(e.kind, np.asarray(flat[e.zoo]), e.groups), order="C", copy=True)
    if e.zoo[-2] in _BATCH_NORMS and e.zoo[-1] == "mean":
      out[e.timm.rsplit(".", 1)[0] + "." + _TRACKED] = np.zeros((), np.int64)
  return out


def load_timm_checkpoint(path, target):
  """The zoo variables of the timm LowFormer safetensors file `path` (a `timm:` prefix is dropped) for `target`
  (a `LowFormer` module or its variables); errors as `timm_to_zoo`, or `SafetensorsError` for an unreadable file."""
  from zoo.checkpoints.safetensors_io import load_file  # pylint: disable=import-outside-toplevel

  path = path[len("timm:") :] if str(path).startswith("timm:") else str(path)
  return timm_to_zoo(load_file(path), target, source=path)


def randomise_norms(torch_model, seed=0):
  """`torch_model` (changed in place and returned) with random BatchNorm running statistics and norm affines, so that
  every one of them shows in the logits of a parity check."""
  import torch  # pylint: disable=g-import-not-at-top

  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in torch_model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)):
        m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
  return torch_model
