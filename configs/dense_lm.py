"""The default run (`make train`): a small dense decoder LM on the embedded Python-stdlib corpus, byte tokens.

Sized to finish on a 2-core CPU in about ten minutes with a clearly falling validation loss.

  python train.py --config configs/dense_lm.py --workdir workdirs/dense_lm
"""
from configs.base import get_base_config


def get_config():
  config = get_base_config(
      model={
          "name": "dense_lm",
          "vocab_size": 259,  # ByteTokenizer: 256 bytes + PAD, BOS, EOS
          "num_layers": 4,
          "embed_dim": 128,
          "num_heads": 4,
          "num_kv_heads": 2,
          "mlp_dim": 384,
      },
      dataset="pystdlib")
  config.data.seq_len = 128
  config.optimizer.lr = 3e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.schedule = "warmup_cosine"
  config.train.steps = 1200
  config.train.batch_size = 32
  config.train.eval_every_steps = 200
  config.train.eval_batches = 16
  config.train.log_every_steps = 50
  config.checkpoint.every_steps = 200
  config.sample.prompt = "def "
  config.sample.max_new_tokens = 160
  config.sample.temperature = 0.7  # greedy decoding of a model this small repeats itself
  config.sample.top_k = 20
  return config
