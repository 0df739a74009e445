"""A class-conditional flow-matching DiT (`zoo/models/dit.py`) on scikit-learn's 8x8 digits, one model on all the
data: the baseline of Decentralized Diffusion Models (`configs/ddm_digits.py`, papers.md D1).

  python train.py --config configs/simplenet_digits.py --workdir workdirs/simplenet_digits  # FD / accuracy features
  python train.py --config configs/flow_digits.py --workdir workdirs/flow_digits
  python evaluate.py --config configs/flow_digits.py --workdir workdirs/flow_digits

Evaluation draws `config.flow_eval.samples` images (the classes of the test images in turn), writes a grid and
reports the Frechet distance and class accuracy of the samples on the SimpleNet run's logits, and the distance of
real training images of the same classes (`fd_real`, the floor).
"""

from configs.base import run_config

STEPS = 4000  # the ensemble's K experts train STEPS / K steps each: equal total training compute


def get_config():
  config = run_config(
    {"name": "dit", "image_size": 8, "channels": 1, "num_classes": 10},
    dataset="digits",
    task="flow_matching",
    lr=1e-3,
    warmup_steps=100,
    weight_decay=0.0,
    steps=STEPS,
    batch_size=64,
    eval_every_steps=1000,
    log_every_steps=100,
    eval_batches=0,  # the whole test split
  )
  config.task_options.num_classes = 10
  config.flow_eval.update(classifier_run="workdirs/simplenet_digits")
  return config
