"""GLIDER (Li et al. 2024, UNITES-Lab/glider; papers.md B3) over LoRA experts of the code-trained dense LM, held-in and
held-out. Four experts, one LoRA each (r=8, alpha 16, every attention and FFN projection) trained in isolation on one
held-in domain of the embedded stdlib corpus; the mixture stacks them frozen and trains only GLIDER's local routers
(each layer's gate vectors on its layer-normed input, top-2) on the four domains together, without the global bias
(GLIDER trains each expert's gate alongside its expert; here the gates train jointly over the frozen experts
[guess]). The global router's task embeddings are each expert's mean input embedding over its training data and the
query's the mean input embedding of the tokens so far [guess: the zoo's stand-in for GLIDER's LLM-written task
instructions]; evaluation adds `s * cos(task, query)` to every layer's logits, s = 100 held-in, 3 held-out.

  python train.py --config configs/dense_lm_code.py --workdir workdirs/dense_lm_code
  for d in docs idlelib lib2to3 multiprocessing; do
    python train.py --config configs/glider_dense_lm.py:expert --workdir workdirs/glider_$d \\
        --config.init_from=workdirs/dense_lm_code "--config.data.domains=('$d',)"
  done
  python train.py --config configs/glider_dense_lm.py --workdir workdirs/glider \\
      --config.init_from=workdirs/dense_lm_code
  # held-in (the four domains' validation text) without and with the global bias:
  python evaluate.py --config configs/glider_dense_lm.py --workdir workdirs/glider --config.lora.glider_scale=0
  python evaluate.py --config configs/glider_dense_lm.py --workdir workdirs/glider --config.lora.glider_scale=100
  # held-out (domains no expert saw):
  python evaluate.py --config configs/glider_dense_lm.py --workdir workdirs/glider --config.lora.glider_scale=3 \\
      "--config.data.domains=('distutils','wsgiref','zoneinfo','urllib')"

Measured (2-core CPU): held-in eval loss 1.823 / 1.810 / 1.807 with s = 0 / 3 / 100 (base 1.906); held-out 1.735 /
1.729 / 1.763 (base 1.738).
"""

from configs.base import small_lm, small_lm_config

HELD_IN = ("docs", "idlelib", "lib2to3", "multiprocessing")  # the stdlib domains with validation text
TARGETS = (r"attention/(query|key|value|out)$", r"ffn/(gate|up|down)$")


def get_config(role="mixture"):
  """role: 'mixture' (GLIDER over the expert runs) or 'expert' (one LoRA on `config.data.domains`)."""
  if role not in ("mixture", "expert"):
    raise ValueError(f"configs/glider_dense_lm.py:{role}: allowed roles are 'mixture' and 'expert'")
  config = small_lm_config(small_lm("dense_lm"), steps=150, batch_size=32, warmup_steps=10, eval_batches=0)
  config.optimizer.update(lr=1e-3, weight_decay=0.0)
  config.train.update(eval_every_steps=50)
  config.lora.update(r=8, alpha=16.0, dropout=0.05, target_modules=TARGETS)
  config.data.domains = HELD_IN[:1] if role == "expert" else HELD_IN
  if role == "mixture":
    config.train.steps = 100
    config.lora.update(
      experts=len(HELD_IN),
      router="glider",
      top_k=2,
      glider_scale=0.0,
      expert_adapters=tuple(f"workdirs/glider_{d}" for d in HELD_IN),
      freeze_experts=True,
    )
  config.sample.max_new_tokens = 0
  return config
