"""Mixture-of-Recursions, token-choice router, recursion-wise KV caching
(papers.md A1), N_r = 3, middle-cycle sharing; steps set for the training FLOPs of the vanilla baseline
(see configs/mor_vanilla.py).

  python train.py --config configs/mor_token_nr3.py --workdir workdirs/mor_token_nr3
"""

from configs.mor_vanilla import isoflop_config, mor_model


def get_config():
  return isoflop_config(mor_model(3, "token", "recursion"))
