"""RMoE (papers.md A3; Qiu et al. 2024, Sec. 3): Mixtral-style top-2 of 8 experts with the layerwise recurrent GRU
router, load-balance coefficient 1e-3, on the dense LM's run (same data, optimizer, steps, attention).

The baseline is `configs/rmoe_linear.py` (the same model with the linear router). Sized for a 2-core CPU: the GRU is
64 wide here [guess: RMoE uses 256 on much wider models].

  python train.py --config configs/rmoe.py --workdir workdirs/rmoe
  # with RMoE's shared expert mixed 0.5 / 0.5:
  python train.py --config configs/rmoe.py --workdir workdirs/rmoe_shared --config.model.num_shared_experts=1
"""

from configs.base import update_model
from configs.moe_mixtral import get_config as get_mixtral_config


def get_config(router_type="gru"):
  return update_model(
    get_mixtral_config(),
    name="rmoe",
    router_type=router_type,
    router_hidden_dim=64,
    load_balance_coef=1e-3,
    z_loss_coef=0.0,
    num_shared_experts=0,
    shared_mix=0.5,
  )
