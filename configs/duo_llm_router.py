"""Duo-LLM (papers.md A6), stage 2: per-layer linear routers (skip / small / big) with at most 1 big layer per token,
started from the random-route model of `configs/duo_llm.py` [guess: the whole model keeps training; the paper's
router training recipe is not published].

  python train.py --config configs/duo_llm_router.py --workdir workdirs/duo_llm_router \
      --config.init_from=workdirs/duo_llm
"""

from configs.duo_llm import get_config as get_duo_config


def get_config():
  config = get_duo_config(route_mode="router")
  config.train.steps = 400
  config.optimizer.warmup_steps = 20
  return config
