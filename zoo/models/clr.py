"""CLR: Ge et al. 2023, "CLR: Channel-wise Lightweight Reprogramming for Continual Learning" (ICCV 2023), section 3.

A frozen ResNet backbone is shared by every task. After each frozen convolution whose kernel is larger than 1x1 (the
stem and every 3x3 conv; the paper's "reduced" variant, as the authors' code `add_ghostnet(..., 'reduced_v1')`
[code]) a channel-wise 3x3 depthwise "reprogramming" convolution (no bias) is inserted, initialised to the identity
(Dirac: centre tap 1, others 0), so that a new task starts from exactly the frozen backbone's features (section 3.2,
eq. 2: `CLR(x) = W_clr * x` per channel). Per task t only its reprogramming convolutions, its BatchNorms (every
BatchNorm of the network is task-specific and trains, as `train_BN` in the authors' code) and its own linear head
train; the backbone's convolutions stay frozen. At ResNet-50 size this is 0.34% of the backbone per task without the
head (`tests/test_clr.py`; the paper reports less than 0.6% with its heads).

Parameter paths (for `config.trainable_params`): the frozen convolutions `.../conv/kernel`, task t's reprogramming
kernels `.../reprogram_{t}` [k, k, channels], its BatchNorms `.../bn_{t}/{scale,bias}` (statistics in `batch_stats`),
its head `head_{t}/{kernel,bias}`; `task_patterns(t)` gives the regular expressions of task t's parameters.

One forward serves rows of different tasks (the task-incremental protocol: a test example comes with its task): each
row uses its own task's reprogramming kernels and BatchNorms (selected with a one-hot over the tasks) and every head
is applied to its features, so `outputs[t]` is meaningful for the rows of task t.

Backbones: the CPU default is a small ResNet of basic blocks on a 3x3 stride-1 stem [guess]; `RESNET50` / `RESNET18`
hold the torchvision layouts (7x7 stride-2 stem and 3x3 max pooling, bottleneck blocks with the stride on the 3x3
conv, 1x1 projection shortcuts), e.g. `build_model({"name": "clr", **RESNET50, "head_classes": (1000,)})`.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from zoo.models.output import ModelOutput
from zoo.models.registry import ConfigError, check_config, register_model

RESNET50 = {"stage_sizes": (3, 4, 6, 3), "width": 64, "block": "bottleneck", "stem": "imagenet"}
RESNET18 = {"stage_sizes": (2, 2, 2, 2), "width": 64, "block": "basic", "stem": "imagenet"}
BOTTLENECK_EXPANSION = 4


def task_patterns(t):
  """Regular expressions (`config.trainable_params`) of task t's parameters: reprogramming kernels, BatchNorms and
  head."""
  return (rf"/reprogram_{t}$", rf"/bn_{t}/", rf"^head_{t}/")


BACKBONE_PATTERN = r"/conv/kernel$"  # the shared convolutions (frozen in CLR, trained by the fine-tuning baseline)


def identity_kernel(key, shape, dtype=jnp.float32):
  """Depthwise kernel [k, k, channels] that copies its input: 1 at the centre tap, 0 elsewhere (Dirac)."""
  del key
  k = shape[0]
  return jnp.zeros(shape, dtype).at[k // 2, k // 2, :].set(1)


def depthwise_per_row(x, kernels):
  """Each row's own depthwise convolution, stride 1, zero padding that keeps the size.

  Args:
    x: [batch, height, width, channels].
    kernels: [batch, k, k, channels] (odd k).

  Returns:
    [batch, height, width, channels]: `out[b, i, j, c] = sum_{u, v} x_pad[b, i + u, j + v, c] * kernels[b, u, v, c]`.
  """
  k = kernels.shape[1]
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  out = jnp.zeros_like(x)
  for u in range(k):
    for v in range(k):
      out = out + xp[:, u : u + h, v : v + w, :] * kernels[:, u, v, None, None, :]
  return out


class TaskNormParams(nn.Module):
  """One task's BatchNorm: `scale`, `bias` [channels] (params) and `mean`, `var` [channels] (batch_stats)."""

  features: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self):
    ones = nn.with_logical_partitioning(nn.initializers.ones, ("norm",))
    zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("norm",))
    scale = self.param("scale", ones, (self.features,), self.param_dtype)
    bias = self.param("bias", zeros, (self.features,), self.param_dtype)
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((self.features,), jnp.float32))
    var = self.variable("batch_stats", "var", lambda: jnp.ones((self.features,), jnp.float32))
    return scale, bias, mean, var


class TaskBatchNorm(nn.Module):
  """BatchNorm with one set of parameters and statistics per task (`bn_{t}`), chosen per row.

  In training (`deterministic=False`) a row with `adapt` True is normalised with the batch statistics of its task's
  adapting rows (over batch, height and width; biased variance, as `nn.BatchNorm`), and that task's running statistics
  move toward them (`momentum`); every other row is normalised with its task's running statistics, as a frozen
  BatchNorm is. In evaluation every row uses its task's running statistics.
  """

  num_tasks: int
  momentum: float = 0.9
  epsilon: float = 1e-5
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, onehot, adapt, deterministic):
    """x: [B, H, W, C]; onehot: [B, tasks] float32 (an all-zero row belongs to no task: its output is 0); adapt: [B]
    bool. Returns [B, H, W, C]."""
    sets = [TaskNormParams(x.shape[-1], self.param_dtype, name=f"bn_{t}")() for t in range(self.num_tasks)]
    scale = onehot @ jnp.stack([s[0] for s in sets]).astype(jnp.float32)  # [B, C]
    bias = onehot @ jnp.stack([s[1] for s in sets]).astype(jnp.float32)
    run_mean = jnp.stack([s[2].value for s in sets])  # [T, C]
    run_var = jnp.stack([s[3].value for s in sets])
    mean, var = onehot @ run_mean, onehot @ run_var  # [B, C]
    xf = x.astype(jnp.float32)
    if not deterministic:
      rows = onehot * adapt.astype(jnp.float32)[:, None]  # [B, T]
      count = jnp.sum(rows, 0) * x.shape[1] * x.shape[2]  # [T]
      safe = jnp.maximum(count, 1.0)[:, None]
      batch_mean = jnp.einsum("bt,bhwc->tc", rows, xf) / safe
      batch_var = jnp.maximum(jnp.einsum("bt,bhwc->tc", rows, xf * xf) / safe - batch_mean**2, 0.0)
      use_batch = adapt.astype(jnp.float32)[:, None]
      mean = use_batch * (onehot @ batch_mean) + (1 - use_batch) * mean
      var = use_batch * (onehot @ batch_var) + (1 - use_batch) * var
      if not self.is_initializing():
        seen = (count > 0)[:, None]
        new_mean = jnp.where(seen, self.momentum * run_mean + (1 - self.momentum) * batch_mean, run_mean)
        new_var = jnp.where(seen, self.momentum * run_var + (1 - self.momentum) * batch_var, run_var)
        for t, s in enumerate(sets):
          s[2].value, s[3].value = new_mean[t], new_var[t]
    y = (xf - mean[:, None, None, :]) * jax.lax.rsqrt(var[:, None, None, :] + self.epsilon)
    return (y * scale[:, None, None, :] + bias[:, None, None, :]).astype(x.dtype)


class ReprogrammedConv(nn.Module):
  """Frozen conv (`conv`, no bias) -> per-task channel-wise reprogramming (only when kernel_size > 1) -> per-task
  BatchNorm. x: [B, H, W, Cin] -> [B, H', W', features]."""

  features: int
  kernel_size: int
  strides: int
  num_tasks: int
  reprogram: bool
  reprogram_kernel: int
  bn_momentum: float
  bn_epsilon: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x, onehot, adapt, deterministic):
    k, pad = self.kernel_size, self.kernel_size // 2
    y = nn.Conv(
      self.features,
      (k, k),
      strides=(self.strides, self.strides),
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      kernel_init=nn.with_logical_partitioning(nn.initializers.kaiming_normal(), (None, None, "conv_in", "conv_out")),
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv",
    )(x)
    if self.reprogram and k > 1:
      r = self.reprogram_kernel
      init = nn.with_logical_partitioning(identity_kernel, (None, None, "conv_out"))
      kernels = jnp.stack(
        [self.param(f"reprogram_{t}", init, (r, r, self.features), self.param_dtype) for t in range(self.num_tasks)]
      )  # [T, r, r, C]
      row_kernels = jnp.einsum("bt,tuvc->buvc", onehot, kernels.astype(jnp.float32)).astype(y.dtype)
      y = depthwise_per_row(y, row_kernels)
    return TaskBatchNorm(self.num_tasks, self.bn_momentum, self.bn_epsilon, self.param_dtype, name="norm")(
      y, onehot, adapt, deterministic
    )


@register_model("clr")
class CLR(nn.Module):
  """A frozen ResNet with CLR's per-task reprogramming, BatchNorms and heads. Config keys are the fields below.

  Attributes:
    head_classes: the classes of each task's head (one head per task; the number of tasks is its length).
    stage_sizes: residual blocks per stage; stage s has `width * 2**s` channels (times 4 out of a bottleneck) and
      stride 2 from the second stage on.
    width: the first stage's width.
    block: 'basic' (two 3x3 convs) or 'bottleneck' (1x1, 3x3, 1x1 with 4x expansion).
    stem: 'small' (3x3 conv, stride 1, `width` channels) [guess for 8x8 images] or 'imagenet' (7x7 stride-2 conv
      with `width` channels, then 3x3 stride-2 max pooling).
    reprogram: insert the reprogramming convolutions (False: the plain multi-head ResNet, the same backbone path).
    reprogram_kernel: the reprogramming kernel size (the paper's 3).
    bn_momentum: BatchNorm running-average momentum (Flax convention; PyTorch's 0.1 = 0.9).
    bn_epsilon: BatchNorm epsilon.
    dtype: compute dtype; logits are returned in float32.
    param_dtype: parameter dtype.
  """

  exposes: ClassVar[tuple[str, ...]] = ()
  head_classes: tuple[int, ...] = (10,)
  stage_sizes: tuple[int, ...] = (1, 1)
  width: int = 16
  block: str = "basic"
  stem: str = "small"
  reprogram: bool = True
  reprogram_kernel: int = 3
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    check_config(
      self,
      positive=("width", "reprogram_kernel"),
      intervals={"bn_momentum": "[0, 1)", "bn_epsilon": "(0, inf)"},
      choices={"block": ("basic", "bottleneck"), "stem": ("small", "imagenet"), "reprogram": (True, False)},
      dtypes=("dtype", "param_dtype"),
    )
    for key in ("head_classes", "stage_sizes"):
      value = getattr(self, key)
      if not isinstance(value, (tuple, list)) or not value or not all(isinstance(v, int) and v > 0 for v in value):
        raise ConfigError(f"config.model.{key}={value!r} must be a non-empty tuple of positive integers")
    if self.reprogram_kernel % 2 == 0:
      raise ConfigError(f"config.model.reprogram_kernel={self.reprogram_kernel} must be odd (a centred kernel)")
    super().__post_init__()

  @property
  def num_tasks(self):
    return len(self.head_classes)

  def _unit(self, features, kernel_size, strides, name):
    return ReprogrammedConv(
      features,
      kernel_size,
      strides,
      self.num_tasks,
      self.reprogram,
      self.reprogram_kernel,
      self.bn_momentum,
      self.bn_epsilon,
      jnp.dtype(self.dtype),
      jnp.dtype(self.param_dtype),
      name=name,
    )

  def _block(self, x, features, strides, name, onehot, adapt, deterministic):
    """One residual block (torchvision's BasicBlock / Bottleneck v1.5)."""
    args = (onehot, adapt, deterministic)
    if self.block == "basic":
      out_features = features
      y = nn.relu(self._unit(features, 3, strides, f"{name}_conv1")(x, *args))
      y = self._unit(features, 3, 1, f"{name}_conv2")(y, *args)
    else:
      out_features = features * BOTTLENECK_EXPANSION
      y = nn.relu(self._unit(features, 1, 1, f"{name}_conv1")(x, *args))
      y = nn.relu(self._unit(features, 3, strides, f"{name}_conv2")(y, *args))
      y = self._unit(out_features, 1, 1, f"{name}_conv3")(y, *args)
    if strides != 1 or x.shape[-1] != out_features:
      x = self._unit(out_features, 1, strides, f"{name}_shortcut")(x, *args)
    return nn.relu(x + y)

  @nn.compact
  def __call__(self, images, *, task=None, adapt=None, deterministic=True):
    """Features of every row through its own task's path, then every head.

    Args:
      images: [batch, height, width, channels] float.
      task: int32 [batch], each row's task in [0, num_tasks), or -1 for a row of no task (its features are 0);
        None = task 0 for every row.
      adapt: bool [batch], the rows whose BatchNorms use batch statistics in training (and update their task's
        running statistics); the others use their task's running statistics. None = every row. Unused in evaluation.
      deterministic: False in training (batch statistics; apply with `mutable=["batch_stats"]`).

    Returns:
      (tuple over tasks of logits [batch, head_classes[t]] float32, ModelOutput with no aux loss).
    """
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"images must be float [batch, height, width, channels], got {images.dtype} {images.shape}")
    batch = images.shape[0]
    task = jnp.zeros((batch,), jnp.int32) if task is None else task
    if not isinstance(task, jax.core.Tracer):
      lo, hi = int(np.min(np.asarray(task))), int(np.max(np.asarray(task)))
      if lo < -1 or hi >= self.num_tasks:
        raise ValueError(
          f"task indices must be in [-1, {self.num_tasks}) (one head per task: head_classes), got {lo}..{hi}"
        )
    adapt = jnp.ones((batch,), bool) if adapt is None else adapt
    onehot = jax.nn.one_hot(task, self.num_tasks, dtype=jnp.float32)  # -1 -> a zero row
    args = (onehot, adapt, deterministic)
    x = images.astype(jnp.dtype(self.dtype))
    if self.stem == "small":
      x = nn.relu(self._unit(self.width, 3, 1, "stem")(x, *args))
    else:
      x = nn.relu(self._unit(self.width, 7, 2, "stem")(x, *args))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for s, blocks in enumerate(self.stage_sizes):
      for b in range(blocks):
        strides = 2 if s > 0 and b == 0 else 1
        x = self._block(x, self.width * 2**s, strides, f"stage{s}_block{b}", *args)
    features = jnp.mean(x, axis=(1, 2))
    logits = tuple(
      nn.Dense(
        n,
        dtype=jnp.dtype(self.dtype),
        param_dtype=jnp.dtype(self.param_dtype),
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_in", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
        name=f"head_{t}",
      )(features).astype(jnp.float32)
      for t, n in enumerate(self.head_classes)
    )
    return logits, ModelOutput()

  def param_counts(self, image_size=32, channels=3):
    """{'total', 'backbone' (frozen convolutions), 'per_task' [tasks] (reprogramming + BatchNorm affine + head),
    'reprogram_bn' [tasks] (without the head)}: parameter counts from the abstract init (nothing computed)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    params = nn.unbox(jax.eval_shape(self.init, jax.random.key(0), images)["params"])
    flat = {"/".join(k): v.size for k, v in traverse_util.flatten_dict(params).items()}
    backbone = sum(n for k, n in flat.items() if k.endswith("/conv/kernel"))
    reprogram_bn = [
      sum(n for k, n in flat.items() if k.endswith(f"/reprogram_{t}") or f"/bn_{t}/" in k)
      for t in range(self.num_tasks)
    ]
    heads = [sum(n for k, n in flat.items() if k.startswith(f"head_{t}/")) for t in range(self.num_tasks)]
    return {
      "total": sum(flat.values()),
      "backbone": backbone,
      "reprogram_bn": reprogram_bn,
      "per_task": [a + b for a, b in zip(reprogram_bn, heads)],
    }
