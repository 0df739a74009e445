"""Recursive Transformer baseline: every token runs every recursion
(papers.md A1), N_r = 2, middle-cycle sharing; steps set for the training FLOPs of the vanilla baseline
(see configs/mor_vanilla.py).

  python train.py --config configs/recursive_nr2.py --workdir workdirs/recursive_nr2
"""

from configs.mor_vanilla import isoflop_config, mor_model


def get_config():
  return isoflop_config(mor_model(2, "none", "recursion"))
