"""The default dense LM trained on Python source only: every domain of the embedded stdlib corpus but the English
documentation ('docs'). The base the fine-tuning comparisons adapt to 'docs' (`configs/qlora_dense_lm.py`).

  python train.py --config configs/dense_lm_code.py --workdir workdirs/dense_lm_code
"""

from configs.dense_lm import get_config as dense_lm_config
from zoo.data.builders import stdlib_domains


def get_config():
  config = dense_lm_config()
  config.data.domains = tuple(d for d in stdlib_domains() if d != "docs")
  config.train.steps = 600
  return config
