"""SMoE-Dropout (papers.md A7): a frozen random router, k growing linearly from 2 to 8 of 8 experts over the 600
optimizer steps, on the embedded Python-stdlib corpus with byte tokens. Sized for a 2-core CPU.

  python train.py --config configs/smoe_dropout.py --workdir workdirs/smoe_dropout
  # self-slimmable evaluation at k = 1, 2, 4, 8:
  python evaluate.py --config configs/smoe_dropout.py --workdir workdirs/smoe_dropout --config.model.eval_k=2
"""

from configs.base import small_lm, small_lm_config


def get_config():
  steps = 600
  model = small_lm(
    "smoe_dropout",
    num_experts=8,
    num_experts_per_tok=8,  # k_max
    expert_mlp_dim=64,
    k_min=2,
    k_schedule="linear",
    k_schedule_steps=steps,
    capacity_factor=0.0,
  )  # no dropping: compare k values without capacity effects
  config = small_lm_config(model, steps=steps, batch_size=16, warmup_steps=60, eval_batches=8)
  # k follows the optimizer step: the model divides its forward-pass counter by the micro-batches per step, read
  # from config.train.grad_accum_steps (a reference, so that --config.train.grad_accum_steps=N reaches the model).
  config.model.grad_accum_steps = config.train.get_ref("grad_accum_steps")
  return config
