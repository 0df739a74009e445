"""The text-to-SQL LMs behind EllieSQL's pipelines (`papers.md` C4, `zoo.routing.ellie_sql`): the pool's small and
medium decoder LMs (`configs/pool_lm.py`) trained alike on the `text_to_sql` questions (`zoo.data.text_to_sql`) with
byte tokens; the loss covers the question and its SQL, written with the question's values as parameters ?1, ?2, ...
(`zoo.data.text_to_sql.link_values`: at 1,500 steps LMs of these sizes did not learn to copy literal values from the
question, 0-3% execution accuracy).

  python train.py --config configs/sql_lm.py:small --workdir workdirs/sql_small
  python train.py --config configs/sql_lm.py:medium --workdir workdirs/sql_medium

256-token windows hold one padded question and its SQL (at most 93 + 158 bytes) [guess: the step count and batch are
sized for a 2-core CPU, not tuned].
"""

from configs.base import run_config, small_lm
from configs.pool_lm import POOL


def get_config(member="medium"):
  """member: 'small' or 'medium' (the pool's shapes)."""
  if member not in ("small", "medium"):
    raise ValueError(f"configs/sql_lm.py:{member}: allowed members are small, medium")
  return run_config(
    small_lm("dense_lm", **POOL[member]),
    dataset="text_to_sql",
    seq_len=256,
    lr=3e-3,
    warmup_steps=100,
    steps=600,
    batch_size=16,
    eval_every_steps=200,
    eval_batches=8,
    log_every_steps=100,
  )
