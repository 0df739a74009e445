"""A slimmable encoder-decoder (papers.md E, "Slimmable encoders"; switchable BatchNorm and the summed loss of Yu et
al. 2019) on scikit-learn's 8x8 digits. `slimmable` trains one shared network at widths 0.25, 0.5, 0.75 and 1.0
together (the sum of the four losses per step); `fixed_{a}` trains the network of width a alone, as a separate model
(the same layers at a * C channels, its own run), the baseline each width of the slimmable network is compared with.

  python train.py --config configs/slimmable_digits.py:slimmable --workdir workdirs/slimmable
  for a in 0.25 0.5 0.75 1.0; do
    python train.py --config configs/slimmable_digits.py:fixed_$a --workdir workdirs/slimmable_fixed_$a
  done
  python evaluate.py --config configs/slimmable_digits.py:slimmable --workdir workdirs/slimmable  # accuracy_w{a}
"""

from configs.base import run_config

WIDTHS = (0.25, 0.5, 0.75, 1.0)
ROLES = ("slimmable", *(f"fixed_{a}" for a in WIDTHS))


def get_config(role="slimmable"):
  """role: 'slimmable' (every width, summed loss) or 'fixed_{a}' for a in 0.25, 0.5, 0.75, 1.0 (width a alone)."""
  if role not in ROLES:
    raise ValueError(f"configs/slimmable_digits.py:{role}: allowed roles are {', '.join(ROLES)}")
  widths = WIDTHS if role == "slimmable" else (float(role.removeprefix("fixed_")),)
  config = run_config(
    {
      "name": "slimmable",
      "num_classes": 10,
      "width_mults": widths,
      "encoder_widths": (16, 32),
      "encoder_strides": (1, 2),
      "bottleneck": 16,
      "decoder_widths": (32,),
    },
    dataset="digits",
    task="slimmable",
    lr=3e-3,
    warmup_steps=20,
    weight_decay=1e-4,
    steps=400,
    batch_size=64,
    eval_every_steps=0,  # evaluate (and checkpoint) at the end
    log_every_steps=100,
    eval_batches=0,  # the whole test split
  )
  config.task_options.width_mults = widths
  return config
