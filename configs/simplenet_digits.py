"""SimpleNet (Hasanpour et al. 2016) at 1/8 width on scikit-learn's 8x8 digits: a few CPU minutes to >= 95% test
accuracy.

  python train.py --config configs/simplenet_digits.py --workdir workdirs/simplenet_digits
  python evaluate.py --config configs/simplenet_digits.py --workdir workdirs/simplenet_digits
"""

from configs.base import run_config


def get_config():
  return run_config(
    {
      "name": "simplenet",
      "num_classes": 10,
      "width_multiplier": 0.125,
      "num_pools": 3,  # 8x8 -> 1x1 after three 2x2 poolings
      "dropout_rate": 0.1,
    },
    dataset="digits",
    task="classification",
    lr=3e-3,
    warmup_steps=50,
    weight_decay=1e-4,
    steps=600,
    batch_size=64,
    eval_every_steps=200,
    log_every_steps=50,
    eval_batches=0,
  )  # the whole test split
