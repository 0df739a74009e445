"""DiLoCo (Douillard et al. 2023, Algorithm 1; papers.md H) on the default dense LM (`configs/dense_lm.py`: same model,
data, inner AdamW, steps and global batch, so the tokens seen equal the data-parallel run's).

4 replicas, each taking 50 inner steps on a quarter of every global batch (8 of 32 sequences) between outer steps;
outer SGD with Nesterov momentum 0.9 and lr 0.7 (the paper's values). Runs on any device count that 4 divides or
that divides 4 (on one CPU device the 4 replicas share it). The other strategies of `zoo.engine.diloco` are one
override away:

  python train.py --config configs/diloco_dense_lm.py --workdir workdirs/diloco_dense_lm
  python train.py --config configs/diloco_dense_lm.py --workdir workdirs/fedavg_dense_lm --config.train.strategy=fedavg
  --config.train.strategy=diloco_overlap | fedavg_hierarchical (train.fedavg_groups=2), --config.train.inner_steps=H
"""

from configs.base import diloco_config
from configs.dense_lm import get_config as get_dense_config


def get_config():
  return diloco_config(get_dense_config())
