"""Decentralized Diffusion Models (McAllister et al. 2025, papers.md D1) on scikit-learn's 8x8 digits: the training
images split into K = 4 k-means clusters on their pixels (`config.data.clusters`; `zoo/data/partition.py`), one
flow-matching DiT per cluster trained in its own run on that cluster only (no shared state), and a small router that
predicts x0's cluster from (x_t, t). The experts are `configs/flow_digits.py`'s model with a quarter of its steps
each, so the ensemble trains with the same total compute as the one model on all the data.

  python train.py --config configs/simplenet_digits.py --workdir workdirs/simplenet_digits
  for k in 0 1 2 3; do
    python train.py --config configs/ddm_digits.py:expert --workdir workdirs/ddm_expert_$k --config.data.cluster=$k
  done
  python train.py --config configs/ddm_digits.py --workdir workdirs/ddm_router
  python evaluate.py --config configs/ddm_digits.py --workdir workdirs/ddm_router --config.evals="('ddm_ensemble',)"

The evaluation samples with the ensemble top-1 (the paper's choice) and with the softmax mixture.

Measured (2-core CPU, 3 sampling seeds, README): FD at guidance 2 one DiT 0.68 / top-1 0.45 / mixture 0.52 (accuracy
1.00 / 0.97 / 0.96); at guidance 1 0.39 / 2.05 / 3.30; router cluster accuracy 84%.
"""

from configs import flow_digits
from configs.base import run_config

CLUSTERS = 4


def get_config(role="router"):
  """role: 'router' (the cluster classifier and the ensemble's evaluation) or 'expert' (one cluster's DiT)."""
  if role not in ("router", "expert"):
    raise ValueError(f"configs/ddm_digits.py:{role}: allowed roles are 'router' and 'expert'")
  if role == "expert":
    config = flow_digits.get_config()
    config.train.steps = flow_digits.STEPS // CLUSTERS
    config.train.eval_every_steps = config.checkpoint.every_steps = config.train.steps // 2
    config.data.update(clusters=CLUSTERS, cluster=0)
    return config
  config = run_config(
    {"name": "flow_router", "num_experts": CLUSTERS, "num_classes": 10, "image_size": 8, "channels": 1},
    dataset="digits",
    task="flow_router",
    lr=1e-3,
    warmup_steps=50,
    weight_decay=0.0,
    steps=1000,
    batch_size=64,
    eval_every_steps=500,
    log_every_steps=100,
    eval_batches=0,
  )
  config.data.clusters = CLUSTERS
  config.flow_eval.update(
    classifier_run="workdirs/simplenet_digits",
    expert_runs=tuple(f"workdirs/ddm_expert_{k}" for k in range(CLUSTERS)),
  )
  return config
