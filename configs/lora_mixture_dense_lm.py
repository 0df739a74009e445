"""Mixtures of LoRA experts vs one LoRA of equal adapter parameters, fine-tuning the code-trained dense LM on English
documentation (`zoo.layers.lora`, `zoo.routing.lora_routers`; papers.md B1-B2). The default is DynMoLE (Li et al.
2025, mikecovlee/DynMoLE): 4 experts of rank 4 (alpha 8, the authors' alpha = 2r) on every attention and FFN
projection, top-p 0.75 with keep-top-k 2, all experts above normalised Tsallis entropy 0.9, its entropy (0.01) and
load-balance (0.001) losses. The comparisons change one key each:

  python train.py --config configs/dense_lm_code.py --workdir workdirs/dense_lm_code
  python train.py --config configs/lora_mixture_dense_lm.py --workdir workdirs/dynmole \\
      --config.init_from=workdirs/dense_lm_code
  # plain top-2 routing of the same experts (softmax over the selected, Switch load balance 0.01):
  ... --workdir workdirs/topk --config.lora.router=topk
  # LoRA-Mixer's routing (top-2 plus the routing-entropy term; its paper adapts the attention projections only):
  ... --workdir workdirs/lora_mixer --config.lora.router=lora_mixer
  # one LoRA of rank 16 = the experts' 4 x 4 (alpha 32): equal adapter parameters (the routers add 4 per input unit):
  ... --workdir workdirs/lora_r16 --config.lora.experts=0 --config.lora.r=16 --config.lora.alpha=32
"""

from configs.base import small_lm, small_lm_config


def get_config():
  config = small_lm_config(small_lm("dense_lm"), steps=300, batch_size=32, warmup_steps=20, eval_batches=16)
  config.data.domains = ("docs",)
  config.optimizer.update(lr=1e-3, weight_decay=0.0)
  config.train.update(eval_every_steps=100)
  config.lora.update(
    r=4,
    alpha=8.0,
    dropout=0.05,
    target_modules=(r"attention/(query|key|value|out)$", r"ffn/(gate|up|down)$"),
    experts=4,
    router="dynmole",
    top_k=2,
    dispatch="dense",
  )
  config.sample.prompt = "The "
  config.sample.max_new_tokens = 160
  config.sample.temperature = 0.7
  config.sample.top_k = 20
  return config
