"""Text retrieval (task 'retrieval'): find a standard-library function's code from its docstring. A small
bidirectional `text_encoder` (mean pooling, L2-normalised embeddings, num_classes=0) on byte tokens embeds both the
docstring's first paragraph and the code (docstrings removed), trained with InfoNCE over the in-batch documents
(temperature 0.05). Data: the embedded 'stdlib_doc_code' pairs (five domain groups: concurrency, gui, markup,
testing, web; the validation split holds other files than the training split). `evaluate.py` ranks the whole
validation corpus for every query: nDCG@10, recall@1 and recall@10, overall and per domain (evaluator 'retrieval').

The base RouterRetriever (papers.md B4) puts its per-domain LoRA experts on.

  python train.py --config configs/retrieval_stdlib.py --workdir workdirs/retrieval_stdlib
  python evaluate.py --config configs/retrieval_stdlib.py --workdir workdirs/retrieval_stdlib
"""

from configs.base import run_config


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
      "num_classes": 0,  # embeddings
    },
    dataset="stdlib_doc_code",
    task="retrieval",
    seq_len=128,  # tokens per query and per document: a docstring's first paragraph (median 51 bytes) or a
    # function's signature and first lines
    lr=2e-3,
    warmup_steps=30,
    steps=400,
    batch_size=64,  # 64 pairs: 63 in-batch negatives per query
    eval_every_steps=100,
    eval_batches=0,  # every validation pair
    log_every_steps=25,
  )
  config.task_options.temperature = 0.05
  config.task_options.symmetric = False
  return config
