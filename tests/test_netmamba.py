"""NetMamba: stride layout, CLS at the end of a unidirectional model, MAE masking, and the masked pre-training task."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zoo.models import ConfigError
from zoo.models.netmamba import NetMamba
from zoo.tasks import get_task

TINY = dict(num_classes=3, packets=2, header_bytes=8, payload_bytes=8, embed_dim=16, depth=2, decoder_dim=8)


def _packets(batch=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, 5, 320)), jnp.int32)


def test_strides_take_each_packets_header_then_payload():
  model = NetMamba(**TINY)
  x = np.zeros((1, 5, 320), np.int32)
  x[0, 0, :8] = np.arange(1, 9)  # packet 0 header
  x[0, 0, 80:88] = np.arange(11, 19)  # packet 0 payload
  x[0, 1, :8] = np.arange(21, 29)
  x[0, 1, 8:80] = 99  # header bytes past header_bytes: dropped
  x[0, 2] = 77  # packet 2: past `packets`
  strides = np.asarray(model.strides(jnp.asarray(x)))
  want = np.concatenate([np.arange(1, 9), np.arange(11, 19), np.arange(21, 29), np.zeros(8)]).reshape(8, 4)
  np.testing.assert_array_equal(strides[0], want)
  assert model.num_strides == 8


def test_classifier_reads_the_cls_token_at_the_end():
  """The model is unidirectional: only a CLS token after the strides sees them all, so changing the FIRST stride
  must change the logits (it would not reach a CLS token at the start)."""
  model = NetMamba(**TINY)
  x = _packets()
  variables = model.init(jax.random.key(0), x)
  logits, _ = model.apply(variables, x)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  changed, _ = model.apply(variables, x.at[:, 0, 0].add(100))
  assert np.abs(np.asarray(changed - logits)).max() > 1e-4


def test_both_modes_have_the_same_parameters():
  model = NetMamba(**TINY)
  x = _packets()
  plain = model.init(jax.random.key(0), x)
  masked = model.init(jax.random.key(0), x, mask_noise=jnp.zeros(x.shape))
  assert jax.tree.structure(plain) == jax.tree.structure(masked)
  assert {"head", "decoder", "decoder_pred", "mask_token", "encoder"} <= set(plain["params"])


def test_masking_keeps_the_lowest_noise_strides_and_hides_the_rest_from_the_encoder():
  model = NetMamba(**{**TINY, "mask_ratio": 0.75})
  x = _packets()
  noise = jax.random.uniform(jax.random.key(3), x.shape)
  variables = model.init(jax.random.key(0), x)
  out, _ = model.apply(variables, x, mask_noise=noise)
  assert out["reconstruction"].shape == out["target"].shape == (2, 8, 4)
  np.testing.assert_allclose(out["target"], model.strides(x) / 255.0)
  per_stride = np.asarray(model.strides(noise))[..., 0]
  want_visible = np.argsort(per_stride, -1)[:, :2]
  masked = np.asarray(out["masked"])
  assert masked.sum(1).tolist() == [6, 6]
  for row in range(2):
    assert set(np.flatnonzero(masked[row] == 0)) == set(want_visible[row])
  # Bytes of masked strides never reach the model: changing them leaves the reconstruction as it is.
  hidden = np.repeat(masked, 4, -1).reshape(2, 2, 16) > 0  # [b, packets, kept bytes]
  bytes_ = np.asarray(x).copy()
  kept = np.concatenate([bytes_[:, :2, :8], bytes_[:, :2, 80:88]], -1)
  kept = np.where(hidden, (kept + 50) % 256, kept)
  bytes_[:, :2, :8], bytes_[:, :2, 80:88] = kept[..., :8], kept[..., 8:]
  again, _ = model.apply(variables, jnp.asarray(bytes_), mask_noise=noise)
  np.testing.assert_allclose(again["reconstruction"], out["reconstruction"], atol=1e-6)
  assert np.abs(np.asarray(again["target"] - out["target"])).max() > 0.1


def test_masked_pretraining_loss_by_hand_and_training_lowers_it():
  task = get_task("masked_pretraining", {"input_key": "packets"})
  outputs = {
    "reconstruction": jnp.asarray([[[0.0, 0.0], [1.0, 1.0]], [[0.5, 0.5], [0.0, 0.0]]]),
    "target": jnp.asarray([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 1.0]]]),
    "masked": jnp.asarray([[1.0, 0.0], [1.0, 1.0]]),
  }
  sums = task.stats(outputs, {}, {"weight": jnp.asarray([1.0, 2.0])})
  # row 0: the masked stride 0 has MSE 0.5; row 1: strides 0.25 and 0.5 -> 0.375, weight 2.
  assert float(sums["loss_sum"]) == pytest.approx(0.5 + 2 * 0.375)
  assert task.finalize(sums, {})["loss"] == pytest.approx((0.5 + 0.75) / 3)

  model = NetMamba(**TINY)
  x = _packets(batch=8, seed=1)
  params = model.init(jax.random.key(0), x)["params"]
  tx = optax.adam(3e-3)
  opt = tx.init(params)
  batch = {"packets": x, "weight": jnp.ones(8)}

  def loss_fn(p, key):
    inputs, _ = task.prepare(batch, {"mask": key})
    out, _ = model.apply({"params": p}, **inputs)
    s = task.stats(out, {}, batch)
    return s["loss_sum"] / s["weight"]

  step = jax.jit(lambda p, o, k: _adam_step(tx, loss_fn, p, o, k))
  first = float(loss_fn(params, jax.random.key(9)))
  for i in range(60):
    params, opt = step(params, opt, jax.random.key(i))
  assert float(loss_fn(params, jax.random.key(9))) < 0.5 * first


def _adam_step(tx, loss_fn, params, opt, key):
  grads = jax.grad(loss_fn)(params, key)
  updates, opt = tx.update(grads, opt, params)
  return optax.apply_updates(params, updates), opt


def test_bad_config_and_input():
  with pytest.raises(ConfigError, match="multiple of stride"):
    NetMamba(**{**TINY, "header_bytes": 3})
  with pytest.raises(ConfigError, match="header_bytes"):
    NetMamba(**{**TINY, "header_bytes": 81})
  with pytest.raises(ConfigError, match="mask_ratio"):
    NetMamba(**{**TINY, "mask_ratio": 1.0})
  model = NetMamba(**TINY)
  with pytest.raises(ValueError, match="packets must be"):
    model.init(jax.random.key(0), jnp.zeros((2, 5, 300), jnp.int32))
