"""EMOv2 (Zhang et al. 2024, papers.md E; `zoo/models/emov2.py`) scaled down for scikit-learn's 8x8 digits, one role
per paper variant: '1m', '2m' or '5m' (default '1m').

  python train.py --config configs/emov2_digits.py --workdir workdirs/emov2_digits_1m
  python train.py --config configs/emov2_digits.py:5m --workdir workdirs/emov2_digits_5m
  python evaluate.py --config configs/emov2_digits.py:5m --workdir workdirs/emov2_digits_5m

Scaling [guess: the paper has no reduced configs]: depths halved (rounded up), widths quartered (rounded to a
multiple of 4), attention heads 4 wide (so every expansion divides into heads), the variant's expansion ratios and
drop-path rate kept. Strides for 8x8: stem 1, stages 1, 2, 1, 2 (maps 8, 8, 4, 4, 2; the paper's 224 px gives
112, 56, 28, 14, 7), windows 2x2 (stage 3: four close and four remote windows; stage 4: one window, the whole map).
Optimizer as the authors' (AdamW, betas 0.9/0.999, weight decay 0.05, warmup then cosine) at a digits-sized lr and
batch [guess].
"""

import math

from configs.base import run_config
from zoo.models.emov2 import VARIANTS


def tiny_model(variant):
  """The model dict of the scaled-down `variant` ('1m', '2m', '5m') for 8x8x1 images, 10 classes."""
  if variant not in VARIANTS:
    raise ValueError(f"configs/emov2_digits.py:{variant}: allowed roles are {', '.join(VARIANTS)}")
  paper = VARIANTS[variant]
  return {
    "name": "emov2",
    "variant": "custom",
    "num_classes": 10,
    "image_size": 8,
    "in_channels": 1,
    "depths": tuple(math.ceil(d / 2) for d in paper["depths"]),
    "widths": tuple(4 * math.floor(w / 16 + 0.5) for w in paper["widths"]),
    "exp_ratios": paper["exp_ratios"],
    "head_dims": (4, 4, 4, 4),
    "window_size": 2,
    "stem_stride": 1,
    "stage_strides": (1, 2, 1, 2),
    "drop_path_rate": paper["drop_path_rate"],
  }


def get_config(variant="1m"):
  """variant: the paper's model to scale down, '1m', '2m' or '5m'."""
  return run_config(
    tiny_model(variant),
    dataset="digits",
    task="classification",
    lr=3e-3,
    warmup_steps=50,
    weight_decay=0.05,
    b2=0.999,
    steps=600,
    batch_size=64,
    eval_every_steps=200,
    log_every_steps=50,
    eval_batches=0,  # the whole test split
  )
