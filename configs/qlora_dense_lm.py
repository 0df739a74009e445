"""QLoRA (Dettmers et al. 2023; papers.md B5, the recipe TSLAM-Mini fine-tunes with) of the code-trained dense LM on
English documentation: the base kernels of every linear layer but the head (attention q/k/v/o, FFN gate/up/down) are
stored in NF4 with double-quantised block scales and dequantised in the bf16 matmul; LoRA r=64, alpha=16, dropout
0.1 (the paper's for models up to 13B) on each; AdamW lr 2e-4, constant after a 3% warmup, gradient clipping 0.3,
no weight decay (the authors' `qlora.py` defaults). `zoo.layers.lora`, `zoo.layers.nf4`.

  python train.py --config configs/dense_lm_code.py --workdir workdirs/dense_lm_code
  python train.py --config configs/qlora_dense_lm.py --workdir workdirs/qlora --config.init_from=workdirs/dense_lm_code
  # the same adapters on the 16-bit base, and full fine-tuning, on the same data:
  python train.py --config configs/qlora_dense_lm.py --workdir workdirs/lora16 \\
      --config.init_from=workdirs/dense_lm_code --config.lora.quantize=
  python train.py --config configs/qlora_dense_lm.py --workdir workdirs/full_ft \\
      --config.init_from=workdirs/dense_lm_code --config.lora.r=0
"""

from configs.base import small_lm, small_lm_config, update_model


def get_config():
  config = small_lm_config(small_lm("dense_lm"), steps=300, batch_size=32, warmup_steps=9, eval_batches=16)
  update_model(config, dtype="bfloat16")  # compute dtype; the adapters and the unquantised rest stay float32
  config.data.domains = ("docs",)
  config.optimizer.update(lr=2e-4, schedule="constant", weight_decay=0.0, b2=0.999, grad_clip_norm=0.3)
  config.train.update(eval_every_steps=100)
  config.lora.update(
    r=64,
    alpha=16.0,
    dropout=0.1,
    target_modules=(r"attention/(query|key|value|out)$", r"ffn/(gate|up|down)$"),
    quantize="nf4",
  )
  config.sample.prompt = "The "
  config.sample.max_new_tokens = 160
  config.sample.temperature = 0.7
  config.sample.top_k = 20
  return config
