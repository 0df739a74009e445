"""CLR (Ge et al. 2023, papers.md E) on scikit-learn's 8x8 digits as task-incremental continual learning: tasks
(0-4), (5, 6), (7, 8, 9) [guess], each with its own head; evaluation scores every task learned so far with its head
(`zoo/tasks/continual.py`). `pretrain` trains the small ResNet (`zoo/models/clr.py`) with task 0's BatchNorms and
head on task 0, the stand-in for the paper's ImageNet pre-training [guess]; `task{t}` then trains only task t's
reprogramming convolutions, BatchNorms and head on the frozen backbone, starting from the previous run; the baseline
`finetune{t}` trains the whole backbone (with task t's BatchNorms and head) on task t alone, from the previous
baseline run, so the earlier tasks' heads see a changed backbone (forgetting). Both chains start from `pretrain`.

  python train.py --config configs/clr_digits.py:pretrain --workdir workdirs/clr_pretrain
  python train.py --config configs/clr_digits.py:task1 --workdir workdirs/clr_task1
  python train.py --config configs/clr_digits.py:task2 --workdir workdirs/clr_task2
  python train.py --config configs/clr_digits.py:finetune1 --workdir workdirs/clr_finetune1
  python train.py --config configs/clr_digits.py:finetune2 --workdir workdirs/clr_finetune2
  python evaluate.py --config configs/clr_digits.py:task2 --workdir workdirs/clr_task2   # accuracy_task0..2

Each role's `config.init_from` is the previous run's workdir above (`workdirs/clr_pretrain` for task1 and
finetune1); override it to chain elsewhere.
"""

from configs.base import run_config
from zoo.models.clr import BACKBONE_PATTERN, task_patterns

TASK_CLASSES = ((0, 1, 2, 3, 4), (5, 6), (7, 8, 9))
WORKDIR = "workdirs/clr_{}"


def _previous(kind, t):
  return WORKDIR.format("pretrain" if t == 1 else f"{kind}{t - 1}")


def get_config(role="pretrain"):
  """role: 'pretrain' (task 0: backbone, task 0's BatchNorms and head), 'task{t}' (CLR: task t's reprogramming,
  BatchNorms and head) or 'finetune{t}' (the baseline: backbone, task t's BatchNorms and head), t = 1..2."""
  roles = ("pretrain", *(f"{k}{t}" for k in ("task", "finetune") for t in range(1, len(TASK_CLASSES))))
  if role not in roles:
    raise ValueError(f"configs/clr_digits.py:{role}: allowed roles are {', '.join(roles)}")
  kind = role.rstrip("0123456789")
  t = 0 if role == "pretrain" else int(role[len(kind) :])
  config = run_config(
    {"name": "clr", "head_classes": tuple(len(c) for c in TASK_CLASSES), "stage_sizes": (1, 1), "width": 16},
    dataset="digits",
    task="continual",
    lr=3e-3,
    warmup_steps=20,
    weight_decay=1e-4,
    steps=300 if role == "pretrain" else 200,
    batch_size=64,
    eval_every_steps=0,  # evaluate (and checkpoint) at the end
    log_every_steps=50,
    eval_batches=0,  # the whole test split
  )
  config.task_options.task_classes = TASK_CLASSES
  config.task_options.current_task = t
  if role == "pretrain":
    config.trainable_params = (BACKBONE_PATTERN, *task_patterns(0)[1:])  # task 0's reprogramming stays the identity
  elif kind == "task":
    config.init_from = _previous(kind, t)
    config.trainable_params = task_patterns(t)
  else:
    config.init_from = _previous(kind, t)
    config.trainable_params = (BACKBONE_PATTERN, *task_patterns(t)[1:])
  return config
