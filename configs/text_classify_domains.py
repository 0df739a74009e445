"""Sequence classification (task 'sequence_classification'): which kind of standard-library text a 256-byte window
comes from, English documentation ('docs') or Python source ('modules', the top-level single-file modules), with a
small bidirectional `text_encoder` (mean pooling) on byte tokens. Windows of the embedded pystdlib corpus, labelled
by the `domain` of their document; the validation split holds other files than the training split.

  python train.py --config configs/text_classify_domains.py --workdir workdirs/text_classify_domains
"""

from configs.base import run_config
from zoo.data.builders import stdlib_domains


def get_config():
  config = run_config(
    {
      "name": "text_encoder",
      "vocab_size": 259,  # ByteTokenizer
      "num_layers": 2,
      "embed_dim": 64,
      "num_heads": 4,
      "mlp_dim": 192,
      "pooling": "mean",
      "num_classes": len(stdlib_domains()),  # the dataset's domain labels (only 'docs' and 'modules' are read)
    },
    task="sequence_classification",
    seq_len=256,
    lr=2e-3,
    warmup_steps=30,
    steps=300,
    batch_size=32,
    eval_every_steps=100,
    log_every_steps=25,
    eval_batches=0,
  )  # every validation window
  config.data.label_key = "domain"
  config.data.domains = ("docs", "modules")
  return config
