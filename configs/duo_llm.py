"""Duo-LLM (papers.md A6), stage 1: the dense LM's run with a big (384) and a small (96) FFN per layer plus skip,
trained with uniformly random per-token per-layer routes. Evaluation runs every layer big.

  python train.py --config configs/duo_llm.py --workdir workdirs/duo_llm
  # stage 2, practical routers at a budget of 1 big layer per token: configs/duo_llm_router.py
"""

from configs.base import update_model
from configs.dense_lm import get_config as get_dense_config


def get_config(route_mode="random"):
  config = get_dense_config()
  return update_model(
    config,
    name="duo_llm",
    small_mlp_dim=config.model.mlp_dim // 4,
    route_mode=route_mode,
    big_budget=1,
    budget_coef=0.1,
  )
