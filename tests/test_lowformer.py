"""LowFormer (papers.md E): parity with timm's `lowformer_*` (random weights and BatchNorm statistics, eval and train
mode), parameter counts against timm and the authors' README, the strict timm <-> zoo conversion and its errors,
`config.init_from='timm:FILE'`, one-line errors for bad configs and images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

from zoo.checkpoints import ConversionError
from zoo.checkpoints.timm_weights import load_timm_checkpoint, randomise_norms, timm_to_zoo, zoo_to_timm
from zoo.models import ConfigError, build_model

# The authors' README (altair199797/LowFormer, "Model Zoo" table, params in millions): B0 14.1, B1 17.9, B1.5 33.9,
# B3 57.1 (the same figures as the paper's ImageNet table).
README_PARAMS_M = {"b0": 14.1, "b1": 17.9, "b15": 33.9, "b3": 57.1}

# A tiny LowFormer in both libraries: every kind of block (stem blocks, stage conv blocks, LowFormer blocks).
TINY_TIMM = dict(
  width_list=[8, 16, 16, 32, 48], depth_list=[1, 2, 1, 1, 2], head_widths=(24, 40), num_classes=10, in_chans=1
)
TINY = dict(
  name="lowformer",
  variant="custom",
  widths=(8, 16, 16, 32, 48),
  depths=(1, 2, 1, 1, 2),
  head_widths=(24, 40),
  num_classes=10,
  in_channels=1,
)


def _timm(name="lowformer_b0", **kwargs):
  torch.manual_seed(0)
  return randomise_norms(timm.create_model(name, pretrained=False, **kwargs).eval())


def _images(shape, seed=0):
  """float32 images [B, C, H, W] (torch layout)."""
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _zoo_logits(model, variables, images, **kwargs):
  """model.apply on torch-layout images (the jitted apply is cached per model and keywords)."""
  key = (model, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
  if key not in _APPLY:
    _APPLY[key] = jax.jit(lambda v, x: model.apply(v, x, **kwargs))
  return _APPLY[key](variables, jnp.asarray(images.transpose(0, 2, 3, 1)))


_APPLY = {}


@pytest.fixture(scope="module")
def b0():
  return _timm()


def test_b0_logits_equal_timm_in_eval_mode(b0):
  model = build_model(dict(name="lowformer", variant="b0"))
  variables = timm_to_zoo(b0.state_dict(), model)
  images = _images((2, 3, 64, 64))
  with torch.no_grad():
    expected = b0(torch.from_numpy(images)).numpy()
  logits, out = _zoo_logits(model, variables, images)
  assert logits.shape == (2, 1000) and out.aux_loss.shape == ()
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
  assert float(np.abs(expected).max()) > 0.1  # the logits are not all ~0
  # The randomised running statistics matter: the model's own fresh ones give other logits.
  fresh = jax.tree_util.tree_map_with_path(
    lambda path, x: np.ones_like(x) if path[-1].key == "var" else np.zeros_like(x), variables["batch_stats"]
  )
  other, _ = _zoo_logits(model, {**variables, "batch_stats": fresh}, images)
  assert float(np.abs(np.asarray(other) - expected).max()) > 1e-2


def test_b0_parameter_count_equals_timm_and_the_authors(b0):
  count = build_model(dict(name="lowformer", variant="b0")).num_params()
  assert count == sum(p.numel() for p in b0.parameters())
  assert abs(count - 14.1e6) <= 0.02 * 14.1e6


@pytest.mark.parametrize("variant", ["b1", "b3"])
def test_other_variants_match_the_authors_parameter_counts(variant):
  count = build_model(dict(name="lowformer", variant=variant)).num_params()
  assert abs(count - README_PARAMS_M[variant] * 1e6) <= 0.02 * README_PARAMS_M[variant] * 1e6


@pytest.mark.parametrize("fused", [True, False])
def test_tiny_custom_equals_timm_at_odd_sizes(fused):
  """Without fused convs: MBConv blocks, the output projection and the depthwise upsampling; 13x11 images exercise
  the crop after the upsampling and the odd maps of the strided convolutions."""
  reference = _timm(**TINY_TIMM, fused_conv=fused)
  model = build_model({**TINY, "fused_conv": fused})
  variables = timm_to_zoo(reference.state_dict(), model)
  assert model.num_params() == sum(p.numel() for p in reference.parameters())
  images = _images((3, 1, 13, 11))
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
  logits, _ = _zoo_logits(model, variables, images)
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_tiny_custom_equals_timm_in_train_mode():
  """Training mode: BatchNorm normalises with the batch statistics and moves its running mean as PyTorch's."""
  reference = _timm(**TINY_TIMM)
  model = build_model(TINY)
  variables = timm_to_zoo(reference.state_dict(), model)
  images = _images((3, 1, 13, 11))
  with torch.no_grad():
    expected = reference(torch.from_numpy(images)).numpy()
    reference.train()
    expected_train = reference(torch.from_numpy(images)).numpy()
  (train_logits, _), state = _zoo_logits(model, variables, images, deterministic=False, mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(train_logits), expected_train, atol=1e-4, rtol=0)
  assert not np.allclose(np.asarray(train_logits), expected, atol=1e-3)  # batch statistics differ from running ones
  # Running means move as PyTorch's (momentum 0.1 <-> Flax 0.9).
  np.testing.assert_allclose(
    state["batch_stats"]["stem_bn"]["mean"], reference.stem[0].norm.running_mean.numpy(), atol=1e-5
  )


def test_zoo_to_timm_loads_strictly_into_timm_and_round_trips():
  reference = _timm(**TINY_TIMM, fused_conv=False)
  model = build_model({**TINY, "fused_conv": False})
  variables = timm_to_zoo(reference.state_dict(), model)
  back = zoo_to_timm(variables)
  target = timm.create_model("lowformer_b0", pretrained=False, **TINY_TIMM, fused_conv=False)
  target.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()}, strict=True)
  for key, value in reference.state_dict().items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def _one_line_error(match, fn, *args, error=ConversionError):
  with pytest.raises(error, match=match) as info:
    fn(*args)
  assert "\n" not in str(info.value)


def test_another_variants_checkpoint_is_one_error_naming_both():
  b1 = timm.create_model("lowformer_b1", pretrained=False, device="meta").state_dict()  # shapes only
  model = build_model(dict(name="lowformer", variant="b0"))
  _one_line_error(
    r"^the checkpoint is lowformer_b1-shaped \(widths 16/32/64/128/256, depths 0/1/1/5/5.*the model is lowformer_b0 "
    r"\(widths 16/32/64/128/256, depths 0/1/1/3/4",
    timm_to_zoo,
    b1,
    model,
  )
  e3 = timm.create_model("lowformer_e3", pretrained=False, device="meta").state_dict()
  _one_line_error(
    r"lowformer_e3-shaped .*mlp off.*the model is lowformer_b3",
    timm_to_zoo,
    e3,
    build_model(dict(name="lowformer", variant="b3")),
  )


def test_missing_unexpected_and_misshapen_keys_are_named():
  state = _timm(**TINY_TIMM).state_dict()
  model = jax.eval_shape(build_model(TINY).init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))  # the tree to fill
  missing = {k: v for k, v in state.items() if k != "stages.2.1.attn.main.1.pwise.weight"}
  _one_line_error(
    r"lacks 'stages\.2\.1\.attn\.main\.1\.pwise\.weight' \(shape \(48, 32, 1, 1\)\)", timm_to_zoo, missing, model
  )
  extra = {**state, "stages.2.1.attn.main.1.o_proj.weight": torch.zeros(32, 16, 1, 1)}
  _one_line_error(r"holds 'stages\.2\.1\.attn\.main\.1\.o_proj\.weight'", timm_to_zoo, extra, model)
  bad = {**state, "stages.0.0.main.spatial_conv.conv.weight": torch.zeros(33, 8, 3, 3)}
  _one_line_error(
    r"'stages\.0\.0\.main\.spatial_conv\.conv\.weight' has shape \(33, 8, 3, 3\), the model needs "
    r"\(32, 8, 3, 3\)",
    timm_to_zoo,
    bad,
    model,
  )
  _one_line_error(
    r"has num_classes=10, the model config\.model\.num_classes=7",
    timm_to_zoo,
    state,
    build_model({**TINY, "num_classes": 7}),
  )
  _one_line_error(
    r"not a timm LowFormer state dict: it has no 'stem\.0\.conv\.weight'",
    timm_to_zoo,
    {"backbone.input_stem.op_list.0.conv.weight": torch.zeros(8, 1, 3, 3)},
    model,
  )


def test_init_from_a_timm_safetensors_file(tmp_path):
  from safetensors.torch import save_file

  from configs import lowformer_digits
  from zoo.engine import trainer

  reference = _timm(**TINY_TIMM)
  path = str(tmp_path / "model.safetensors")
  save_file(reference.state_dict(), path)
  config = lowformer_digits.get_config()
  config.model.update({k: v for k, v in TINY.items() if k != "name"})
  config.init_from = f"timm:{path}"
  ((where, source, variables),) = trainer.Experiment(config, jax.devices()[:1]).load_init_from()
  assert where == "" and source == f"timm:{path}"
  expected = timm_to_zoo(reference.state_dict(), build_model(config.model.to_dict()))
  for x, y in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(x, y)
  # A sub-tree target (what the dict form of init_from hands over) takes the same file.
  sub = jax.eval_shape(build_model(config.model.to_dict()).init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  assert jax.tree.structure(load_timm_checkpoint(path, sub)) == jax.tree.structure(expected)
  wider = build_model({**TINY, "widths": (8, 16, 16, 32, 64)})
  with pytest.raises(ConversionError, match=f"^{path} is a custom LowFormer .*widths 8/16/16/32/48.*the model is a "):
    load_timm_checkpoint(f"timm:{path}", wider)


def test_images_the_model_cannot_take_raise_one_line():
  model = build_model(TINY)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  for shape, match in [
    ((2, 8, 8, 3), "3 channels but config.model.in_channels=1"),
    ((2, 0, 8, 1), "cannot take images of 0x8: height and width >= 1"),
    ((8, 8, 1), "images must be float"),
  ]:
    _one_line_error(match, lambda s: jax.eval_shape(model.apply, variables, jnp.zeros(s)), shape, error=ValueError)


@pytest.mark.parametrize(
  "bad, match",
  [
    (dict(variant="b4"), "variant='b4' is invalid"),
    (dict(variant="b0"), "variant='b0' fixes widths, depths, head_widths; set variant='custom'"),
    (dict(depths=None), "variant='custom' needs config.model.widths and config.model.depths"),
    (dict(widths=(8, 16, 16, 32)), r"widths=\(8, 16, 16, 32\) must be 5 integers >= 1"),
    (dict(stage_strides=(1, 3, 1, 2)), "stage_strides"),
    (dict(attention_strides=(0, 1)), "attention_strides"),
    (dict(downsample_expand_ratios=(4, 4, 0, 4)), "downsample_expand_ratios"),
    (dict(widths=(8, 16, 16, 1, 48)), r"widths\[3\]=1: Lowtention needs at least 2 channels"),
  ],
)
def test_bad_config_raises(bad, match):
  _one_line_error(match, build_model, {**TINY, **bad}, error=ConfigError)
