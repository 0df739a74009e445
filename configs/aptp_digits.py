"""APTP (Ganjdanesh et al. 2024, papers.md D2): prompt-routed pruning of the flow-matching DiT of
`configs/flow_digits.py` on scikit-learn's 8x8 digits, prompts being templated captions ("a bold handwritten seven",
`zoo/tasks/aptp.py`). Two phases, as in the paper: `prune` trains only the prompt router and its 8 architecture
codes (the DiT frozen; distillation to the unpruned DiT, resource loss toward 60% of its FLOPs, contrastive loss),
`finetune` fixes each prompt's architecture (its code's hard gates) and trains the shared DiT weights. The role
`static` is the same pipeline with one code: a single pruned architecture for every prompt, the baseline at the same
FLOPs target.

  python train.py --config configs/simplenet_digits.py --workdir workdirs/simplenet_digits
  python train.py --config configs/flow_digits.py --workdir workdirs/flow_digits
  python train.py --config configs/aptp_digits.py:prune --workdir workdirs/aptp_prune
  python train.py --config configs/aptp_digits.py:finetune --workdir workdirs/aptp
  python evaluate.py --config configs/aptp_digits.py:finetune --workdir workdirs/aptp
  # the static baseline: the same with :static_prune / :static; the unpruned DiT fine-tuned as long:
  python train.py --config configs/aptp_digits.py:unpruned --workdir workdirs/aptp_unpruned

Measured (2-core CPU, 3 sampling seeds, README): FD at guidance 2 unpruned 0.71 / static 0.65 at 57% FLOPs / APTP 0.47
at 61% (7 codes used); at guidance 1 0.27 / 0.55 / 0.69; test flow loss 0.395 / 0.412 / 0.420.
"""

from configs import flow_digits
from configs.base import run_config

ROLES = ("prune", "finetune", "static_prune", "static", "unpruned")
PRUNE_STEPS = 1000  # [guess] the router phase
FINETUNE_STEPS = 1000  # [guess] the fine-tuning phase


def get_config(role="finetune"):
  """role: 'prune' / 'finetune' (APTP, 8 codes), 'static_prune' / 'static' (one code), or 'unpruned' (the DiT
  fine-tuned exactly as the pruned ones, flow matching + distillation, with every gate open)."""
  if role not in ROLES:
    raise ValueError(f"configs/aptp_digits.py:{role}: allowed roles are {', '.join(ROLES)}")
  base = flow_digits.get_config()
  pruning = role in ("prune", "static_prune")
  config = run_config(
    {**base.model.to_dict(), "name": "aptp", "num_codes": 8 if role in ("prune", "finetune") else 1},
    dataset="digits",
    task="aptp",
    lr=3e-2 if pruning else 3e-4,  # [guess]: the gate logits start 3 (the offset) above closing
    warmup_steps=50,
    weight_decay=0.0,
    steps=PRUNE_STEPS if pruning else FINETUNE_STEPS,
    batch_size=64,
    eval_every_steps=500,
    log_every_steps=100,
    eval_batches=0,
  )
  config.task_options.num_classes = 10
  config.flow_eval.update(classifier_run=base.flow_eval.classifier_run)
  prune_run = "workdirs/static_prune" if role.startswith("static") else "workdirs/aptp_prune"
  if role == "unpruned":  # every gate open (offset 3, no pruning phase): the same fine-tuning, nothing pruned
    config.init_from = {"student": "workdirs/flow_digits", "teacher": "workdirs/flow_digits"}
    config.model.freeze_architecture = True
    config.trainable_params = ("^student/",)
  elif pruning:
    config.init_from = {"student": "workdirs/flow_digits", "teacher": "workdirs/flow_digits"}
    config.trainable_params = ("^router/",)
  else:
    config.init_from = prune_run
    config.model.freeze_architecture = True
    config.trainable_params = ("^student/",)
  config.frozen_params = ("^teacher/",)
  return config
