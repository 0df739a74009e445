"""The default run (`make train`): a small dense decoder LM on the embedded Python-stdlib corpus, byte tokens.

Sized to finish on a 2-core CPU in about ten minutes with a clearly falling validation loss.

  python train.py --config configs/dense_lm.py --workdir workdirs/dense_lm
"""

from configs.base import small_lm, small_lm_config


def get_config():
  config = small_lm_config(small_lm("dense_lm"), steps=1200, batch_size=32, warmup_steps=100, eval_batches=16)
  config.sample.prompt = "def "
  config.sample.max_new_tokens = 160
  config.sample.temperature = 0.7  # greedy decoding of a model this small repeats itself
  config.sample.top_k = 20
  return config
