"""AdaptDHM (papers.md G) on the embedded 'ctr_domains' click log (`zoo/data/ctr.py`: a documented generator, 4
domains, 7 categorical fields, 3 numeric features, 80K / 20K rows), with its two baselines as roles of the same model:
one shared tower, and one tower per domain.

  python train.py --config configs/adaptdhm_ctr.py --workdir workdirs/adaptdhm_ctr
  python train.py --config configs/adaptdhm_ctr.py:shared --workdir workdirs/adaptdhm_shared
  python train.py --config configs/adaptdhm_ctr.py:domain --workdir workdirs/adaptdhm_domain

K = 4 clusters, centre temperature 0.1 (with the formula's temperature 1 the centres collapse onto one direction;
see `zoo/models/adaptdhm.py`), towers 256-128 [guess], AdamW lr 1e-3, batch 512, 600 steps (about 4 epochs).
Evaluation reports AUC and log-loss, overall and per domain.
"""

from configs.base import run_config
from zoo.data.ctr import CARDINALITIES, DOMAIN_NAMES, NUMERIC_NAMES

ROLES = {"adaptdhm": "clusters", "shared": "shared", "domain": "domain"}


def get_config(role="adaptdhm"):
  """role: 'adaptdhm' (per-cluster towers), 'shared' (one tower) or 'domain' (one tower per domain)."""
  if role not in ROLES:
    raise ValueError(f"configs/adaptdhm_ctr.py:{role}: allowed roles are {sorted(ROLES)}")
  config = run_config(
    {
      "name": "adaptdhm",
      "cardinalities": CARDINALITIES,
      "numeric_features": len(NUMERIC_NAMES),
      "num_domains": len(DOMAIN_NAMES),
      "embed_dim": 16,
      "tower_dims": (256, 128),
      "num_clusters": 4,
      "temperature": 0.1,
      "assignment": ROLES[role],
    },
    dataset="ctr_domains",
    task="ctr",
    lr=1e-3,
    warmup_steps=30,
    weight_decay=1e-5,
    steps=600,
    batch_size=512,
    eval_every_steps=300,
    log_every_steps=50,
    eval_batches=0,
  )
  config.task_options.num_domains = len(DOMAIN_NAMES)
  return config
