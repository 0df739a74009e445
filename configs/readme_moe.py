"""Read-ME (papers.md A4): the dense LM's run with its FFNs refactored into a shared expert + 4 domain experts,
routed top-1 by the pre-gating router; sized for a 2-core CPU.

Domains for expert extraction (`DOMAIN_GROUPS`, one expert each) group the `pystdlib` corpus's `domain` labels
(`zoo/data/builders.py`): documentation prose, top-level stdlib modules, web / data-format packages, and the other
packages (runtime, tooling, GUI). `tools/readme_extract.py` refactors a trained `dense_lm` run into this model's
experts (per-group neuron statistics on batches drawn with `config.data.domains=group`):

  python tools/readme_extract.py --config configs/readme_moe.py --workdir workdirs/readme_extracted \
    --dense_workdir workdirs/dense_lm

Alternating phases (Read-ME Sec. 3.2), each starting from the previous workdir (the first from the extracted one,
`--config.init_from=workdirs/readme_extracted`, or from scratch as here):

  python train.py --config configs/readme_moe.py --workdir workdirs/readme_joint
  python train.py --config configs/readme_moe.py --workdir workdirs/readme_router \
    --config.model.train_phase=router --config.init_from=workdirs/readme_joint --config.optimizer.weight_decay=0
  python train.py --config configs/readme_moe.py --workdir workdirs/readme_backbone \
    --config.model.train_phase=backbone --config.init_from=workdirs/readme_router --config.optimizer.weight_decay=0
"""

from configs.base import small_lm, small_lm_config

DOMAIN_GROUPS = {
  "docs": ("docs",),
  "modules": ("modules",),
  "web": ("email", "html", "http", "json", "urllib", "wsgiref", "xml", "xmlrpc"),
  "packages": (
    "asyncio",
    "concurrent",
    "ctypes",
    "curses",
    "dbm",
    "distutils",
    "ensurepip",
    "idlelib",
    "importlib",
    "lib2to3",
    "logging",
    "multiprocessing",
    "re",
    "tkinter",
    "tomllib",
    "turtledemo",
    "unittest",
    "venv",
    "zoneinfo",
  ),
}


def get_config():
  # The dense FFN (mlp_dim 384) the experts come from; shared and expert widths default to 192.
  model = small_lm(
    "readme_moe",
    num_experts=len(DOMAIN_GROUPS),
    router_layers=1,
    router_num_heads=4,
    router_mlp_dim=256,
    train_phase="joint",
  )
  return small_lm_config(model, steps=1200, batch_size=32, warmup_steps=100, eval_batches=16)
