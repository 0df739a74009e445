"""LoRA fine-tuning of a trained dense LM: rank-8 adapters (alpha 16, PEFT's default init: B = 0) on the q/k/v/o
projections of every attention layer and on the FFN projections; only the adapters train, the base is frozen (no
gradients, no optimizer state). Hu et al. 2021, section 4; `zoo.layers.lora`.

The base comes from `config.init_from`: a zoo checkpoint (e.g. the default run) or a Hugging Face directory, whose
config.json then sets the model and whose tokenizer.json the data's tokens. Without it the adapters sit on a fresh
random base (what the config tests run).

  python train.py --config configs/dense_lm.py --workdir workdirs/dense_lm
  python train.py --config configs/lora_dense_lm.py --workdir workdirs/lora_dense_lm \\
      --config.init_from=workdirs/dense_lm
  python train.py --config configs/lora_dense_lm.py --workdir workdirs/lora_qwen3 \\
      --config.init_from=hf:/path/to/Qwen3-dir --config.data.seq_len=512
  python tools/convert_hf.py lora-to-peft workdirs/lora_qwen3 out/qwen3_lora   # a PEFT adapter of the HF base
"""

from configs.base import small_lm, small_lm_config


def get_config():
  config = small_lm_config(small_lm("dense_lm"), steps=300, batch_size=32, warmup_steps=20, eval_batches=16)
  config.optimizer.update(lr=1e-3, weight_decay=0.0)
  config.lora.update(
    r=8,
    alpha=16.0,
    dropout=0.05,
    target_modules=(r"attention/(query|key|value|out)$", r"ffn/(gate|up|down)$"),
  )
  config.sample.prompt = "def "
  config.sample.max_new_tokens = 160
  config.sample.temperature = 0.7
  config.sample.top_k = 20
  return config
