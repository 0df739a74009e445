"""The RMoE baseline (papers.md A3): `configs/rmoe.py` with the linear softmax top-2 router instead of the GRU.

python train.py --config configs/rmoe_linear.py --workdir workdirs/rmoe_linear
"""

from configs.rmoe import get_config as get_rmoe_config


def get_config():
  return get_rmoe_config(router_type="linear")
