"""Sample quality of flow-matching models: sampling with guidance, the Frechet distance and class accuracy on the
features of a zoo classifier trained on the same images, and sample grids (the 'flow_samples' and 'ddm_ensemble'
evaluators).

The Frechet distance (Heusel et al. 2017, FID's formula) is computed on the logits of a zoo classifier run
(`config.flow_eval.classifier_run`, e.g. `configs/simplenet_digits.py`), not on Inception features: numbers are
comparable between runs of this zoo on the same images only.

Options (`config.flow_eval`): `samples` (images drawn, with the classes of the evaluation images in turn), `steps`
and `sampler` ('euler' | 'heun') of the integration from t = 1 to 0, `guidance` (classifier-free guidance scale; 1 =
the conditional velocity alone), `classifier_run` ('' = no distance or accuracy), `expert_runs` (the 'ddm_ensemble'
experts, one flow-matching run per cluster), `seed`.
"""

import numpy as np

from zoo.models import ConfigError

DEFAULTS = {
  "samples": 500,
  "steps": 32,
  "sampler": "euler",
  "guidance": 2.0,  # [guess: DiT samples at 1.5-4]
  "classifier_run": "",
  "expert_runs": (),
  "seed": 0,
}
SAMPLERS = ("euler", "heun")


def options(config):
  """`config.flow_eval` over `DEFAULTS`, checked."""
  given = dict(config.get("flow_eval") or {})
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ConfigError(f"unknown key config.flow_eval.{unknown[0]}; valid keys: {sorted(DEFAULTS)}")
  o = {**DEFAULTS, **given}
  o["expert_runs"] = tuple(o["expert_runs"])
  for key in ("samples", "steps"):
    if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] < 1:
      raise ConfigError(f"config.flow_eval.{key}={o[key]!r} is invalid; allowed: an integer >= 1")
  if o["sampler"] not in SAMPLERS:
    raise ConfigError(f"config.flow_eval.sampler={o['sampler']!r} is invalid; allowed: {SAMPLERS}")
  if not isinstance(o["guidance"], (int, float)) or isinstance(o["guidance"], bool) or o["guidance"] < 0:
    raise ConfigError(f"config.flow_eval.guidance={o['guidance']!r} is invalid; allowed: a number >= 0")
  return o


def sample_labels(exp, n, num_classes):
  """The classes of `n` samples: the evaluation images' labels in turn, so that the samples have the class frequencies
  of the reference the Frechet distance compares them with (a uniform draw against the digits' unbalanced test split
  costs more distance than the models differ by); zeros when unconditional."""
  if not num_classes:
    return np.zeros((n,), np.int32)
  _, labels = real_images(exp, n)
  return labels[np.arange(n) % len(labels)].astype(np.int32)


def frechet_distance(a, b):
  """Frechet distance between Gaussians fit to features a [N, D] and b [M, D]:
  `|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)` (symmetric square roots by eigendecomposition)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mu_a, mu_b = a.mean(0), b.mean(0)
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

  def sqrt_psd(m):
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

  root_a = sqrt_psd(s_a)
  cross = np.trace(sqrt_psd(root_a @ s_b @ root_a))
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def save_grid(images, path, columns=10):
  """Write images [N, H, W, C] in [0, 1] as one PNG grid (rows of `columns`); returns path."""
  from zoo.evaluators.base import pyplot, save_figure  # pylint: disable=g-import-not-at-top

  images = np.asarray(images)
  n = len(images)
  rows = -(-n // columns)
  plt = pyplot()
  fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.8, rows * 0.8), squeeze=False)
  for i, ax in enumerate(axes.ravel()):
    ax.axis("off")
    if i < n:
      image = images[i]
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
  return save_figure(fig, path, bbox_inches="tight")


def classifier(exp, run):
  """(logits function images [N, H, W, C] in [0, 1] -> [N, classes], num_classes) of the classifier run `run`, on
  the evaluated experiment's devices.

  Raises:
    ConfigError: `run` is not a classifier of images of the evaluated shape.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from zoo.engine import trainer, writers  # pylint: disable=g-import-not-at-top

  try:
    config = writers.read_config(run)
  except FileNotFoundError as e:
    raise ConfigError(f"config.flow_eval.classifier_run: {e}") from None
  if config.get("task") != "classification":
    raise ConfigError(
      f"config.flow_eval.classifier_run: {run} trains task {config.get('task')!r}; allowed: a 'classification' run on "
      "the same images"
    )
  classifier_exp = trainer.Experiment(config, exp.mesh.devices.reshape(-1).tolist())
  if tuple(classifier_exp.info["image_shape"]) != tuple(exp.info["image_shape"]):
    raise ConfigError(
      f"config.flow_eval.classifier_run: {run} classifies images of shape {classifier_exp.info['image_shape']}, the "
      f"evaluated model makes {exp.info['image_shape']}"
    )
  _, state, _ = trainer.restore_run(classifier_exp, run)
  variables = jax.device_get(state.variables())
  apply = jax.jit(lambda images: classifier_exp.model.apply(variables, images=images)[0])

  def logits(images, batch=256):
    return np.concatenate([np.asarray(apply(images[i : i + batch])) for i in range(0, len(images), batch)])

  return logits, int(classifier_exp.info["num_classes"])


def real_images(exp, limit, split=None):
  """Up to `limit` images [N, H, W, C] and labels [N] of the evaluated config's data (the evaluation split)."""
  images, labels = [], []
  for batch in exp.make_iterator(split or exp.config.data.eval_split, repeat=False, drop_remainder=False):
    images.append(batch["image"])
    labels.append(batch["label"])
    if sum(len(x) for x in images) >= limit:
      break
  return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]


def training_images_like(exp, labels):
  """Real images of the training split with the given labels [N] (each class's images in turn; all images, in turn,
  when `labels` is all zeros of an unconditional model): the distance real data of the same classes has."""
  images, train_labels = real_images(exp, 1 << 30, exp.config.data.train_split)
  if not np.any(labels):
    return images[np.arange(len(labels)) % len(images)]
  chosen = np.empty((len(labels), *images.shape[1:]), images.dtype)
  for c in np.unique(labels):
    pool = images[train_labels == c]
    where = np.flatnonzero(labels == c)
    chosen[where] = pool[np.arange(len(where)) % len(pool)]
  return chosen


def quality(sample_logits, labels, reference_logits, real_logits=None):
  """{'fd': Frechet distance of the samples' classifier logits [N, C] to the real images' [M, C], 'sample_accuracy':
  the share of samples the classifier gives their conditioning class (labels [N]), and with `real_logits` (of
  `training_images_like`) 'fd_real': the distance of real training images of the same classes, the floor the
  samples' distance compares with}."""
  results = {
    "fd": frechet_distance(sample_logits, reference_logits),
    "sample_accuracy": float(np.mean(np.argmax(sample_logits, -1) == labels)),
  }
  if real_logits is not None:
    results["fd_real"] = frechet_distance(real_logits, reference_logits)
  return results
