"""RouterRetriever (Lee et al. 2024, papers.md B4) on docstring -> code retrieval over the standard library: one LoRA
expert per domain group on the frozen retriever of `configs/retrieval_stdlib.py` (r=8, alpha 16 on the attention
and FFN projections [guess: the paper's expert rank is not in papers.md]), and the multi-task LoRA baseline (the
same adapter trained on every domain for the same steps). The 'router_retriever' evaluator routes each query and
document to an expert by its base embedding's mean similarity to the experts' pilot embeddings and scores base,
routed and oracle (`zoo.evaluators.router_retriever`).

  python train.py --config configs/retrieval_stdlib.py --workdir workdirs/retrieval_stdlib
  for d in concurrency gui markup testing web; do
    python train.py --config configs/router_retriever_stdlib.py --workdir workdirs/rr_$d \\
        --config.init_from=workdirs/retrieval_stdlib "--config.data.domains=('$d',)"
  done
  python train.py --config configs/router_retriever_stdlib.py --workdir workdirs/rr_multitask \\
      --config.init_from=workdirs/retrieval_stdlib
  python evaluate.py --config configs/router_retriever_stdlib.py --workdir workdirs/rr_multitask   # multi-task LoRA
  python evaluate.py --config configs/retrieval_stdlib.py --workdir workdirs/retrieval_stdlib \\
      "--config.evals=('retrieval','router_retriever')" \\
      "--config.router_retriever.expert_runs=('workdirs/rr_concurrency','workdirs/rr_gui','workdirs/rr_markup','workdirs/rr_testing','workdirs/rr_web')"

Measured (2-core CPU): nDCG@10 base 0.150, multi-task LoRA 0.150, routed 0.106 (routing accuracy 0.26), oracle
domain expert 0.176; the table per domain is in the README.
"""

from configs.retrieval_stdlib import get_config as retrieval_config


def get_config():
  config = retrieval_config()
  config.train.update(steps=200, eval_every_steps=100)
  config.optimizer.update(lr=1e-3, warmup_steps=10, weight_decay=0.0)
  config.lora.update(
    r=8, alpha=16.0, dropout=0.0, target_modules=(r"attention/(query|key|value|out)$", r"ffn/(gate|up|down)$")
  )
  config.evals = ("retrieval",)
  return config
