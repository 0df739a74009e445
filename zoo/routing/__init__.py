"""Shared routing primitives: routers, dispatch/combine, auxiliary losses, routing metrics (pure functions).

Flow: router logits -> a router (`softmax_topk`, `sigmoid_topk`, `expert_choice`, ...) -> `Routing` record
(expert ids, combine weights, probabilities, aux losses, metrics) -> `moe_ffn` (dispatch, experts, combine).
The Linen modules `Router` and `MoEFFN` own the parameters; `MoEFFN` runs either the local dispatch
(`zoo.routing.dispatch.moe_ffn`) or expert parallelism (`zoo.routing.expert_parallel`). Models pick routers by name
from the router registry (`register_router`, `get_router`, `router_names`).
"""

from zoo.routing.dispatch import (
  DISPATCH_MODES,
  GATED_ACTIVATIONS,
  PERMUTES,
  PLAIN_ACTIVATIONS,
  capacity,
  capacity_ffn,
  default_dispatch,
  dense_ffn,
  dropless_ffn,
  moe_ffn,
)
from zoo.routing.expert_parallel import expert_parallel_ffn
from zoo.routing.losses import expert_fraction, load_balance_loss, router_z_loss
from zoo.routing.metrics import routing_metrics, stack_layer_metrics
from zoo.routing.moe import MoEFFN, Router
from zoo.routing.registry import get_router, register_router, router_names
from zoo.routing.routers import (
  Routing,
  expert_choice,
  group_limited_mask,
  jitter,
  routing_from_dense,
  sigmoid_topk,
  softmax_topk,
  update_balance_bias,
)

__all__ = [
  "GATED_ACTIVATIONS",
  "PERMUTES",
  "PLAIN_ACTIVATIONS",
  "DISPATCH_MODES",
  "MoEFFN",
  "Router",
  "Routing",
  "capacity",
  "capacity_ffn",
  "default_dispatch",
  "dense_ffn",
  "dropless_ffn",
  "expert_choice",
  "expert_fraction",
  "expert_parallel_ffn",
  "get_router",
  "group_limited_mask",
  "jitter",
  "load_balance_loss",
  "moe_ffn",
  "register_router",
  "router_names",
  "router_z_loss",
  "routing_from_dense",
  "routing_metrics",
  "sigmoid_topk",
  "softmax_topk",
  "stack_layer_metrics",
  "update_balance_bias",
]
