"""DiLoCo (Douillard et al. 2023, Algorithm 1; papers.md H) on the Mixtral-style MoE (`configs/moe_mixtral.py`: 8
experts, top-2, the dense LM's data, inner AdamW, steps and global batch).

4 replicas, 50 inner steps per round, outer SGD with Nesterov momentum 0.9 and lr 0.7. Every replica routes with its
own copy of the routers between outer steps; metrics.jsonl logs, at each outer step, `router_drift` (how far the
replicas' routers moved apart, relative to their mean) and `replica_expert_load` [replicas, layers, experts].

  python train.py --config configs/diloco_moe_mixtral.py --workdir workdirs/diloco_moe_mixtral
  --config.train.strategy=diloco_overlap | fedavg | fedavg_hierarchical, --config.train.inner_steps=H
"""

from configs.base import diloco_config
from configs.moe_mixtral import get_config as get_moe_config


def get_config():
  return diloco_config(get_moe_config())
