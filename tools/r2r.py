"""R2R token routing between a small and a large LM of the zoo (papers.md C1; Fu et al. 2025, "Roads to Rome"):
label -> train the router -> choose its threshold -> save it.

  python tools/r2r.py --small workdirs/pool_small --large workdirs/pool_large --out workdirs/r2r

1. Labels (`zoo.routing.r2r.label_tokens`): the large model writes `--response-len` greedy tokens after each of
   `--train-prompts` prompts (the first `--prompt-len` tokens of training-split windows) and `--val-prompts`
   validation-split prompts; the small model prefills them; agreements are 0; each disagreement is continued by the
   large model from both tokens for `--horizon` tokens (to the first newline) and is 1 when the small model's branch
   has a mean NLL under the large model more than `--margin` nats per token above the large model's own branch.
2. The router (`zoo.models.r2r`, model 'r2r') is trained on the training labels with R2R's BCE (pos_weight =
   #neg / #pos), AdamW (weight decay 5e-4 [code]; lr `--lr`, 1e-3 [guess: the authors' 5e-5 is for 1024-wide
   routers over millions of tokens]) in batches of `--batch-size` for `--epochs` epochs, keeping the epoch with the
   lowest validation loss (the authors' checkpoint selection).
3. tau: the largest threshold with recall >= `--recall` (0.95, the authors' rule) of the validation labels.

Writes `--out`/router.msgpack and router.json (the router's keys, tau, the label statistics); refuses a directory
that already holds a router unless `--overwrite`; bad input is one line on stderr, exit code 2. Prints a summary
and, as its last line, one JSON object. `bench/r2r_decode.py` measures routed decoding with the saved router.
"""

import argparse
import json
import os
import sys
import time

LABELLING_KEYS = ("prompt_len", "response_len", "horizon", "margin", "train_prompts", "val_prompts", "seed")


def _prompts(config, split, count, length, seed):
  """[count, length] int32: the first `length` tokens of `count` windows of `split`."""
  import numpy as np

  from zoo.data import make_iterator

  it = make_iterator(config.data, split=split, global_batch_size=count, seed=seed, repeat=False)
  return np.asarray(next(it)["inputs"][:, :length], np.int32)


def label_stats(labels):
  """Summary of a `label_tokens` result: tokens, agreement rate, divergent rate among disagreements, positives."""
  agree, label = labels["agree"], labels["label"]
  return {
    "tokens": int(agree.size),
    "agree_rate": float(agree.mean()),
    "divergent_of_disagreements": float(label.sum() / max(1, (~agree).sum())),
    "positive_rate": float(label.mean()),
  }


def train_router(router, train, val, *, lr, epochs, batch_size, seed=0):
  """Trains `router` on the feature dicts `train` / `val` (with 'label'); returns (best variables, history)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from zoo.routing.r2r import positive_weight, router_loss

  keys = ("hidden_states", "token_embeddings", "top_logits")
  pos_weight = positive_weight(train["label"])
  variables = router.init(jax.random.key(seed), **{k: jnp.asarray(train[k][:1]) for k in keys})
  params = variables["params"]
  opt = optax.adamw(lr, weight_decay=5e-4)
  opt_state = opt.init(params)

  def loss_fn(params, batch, rng, deterministic):
    logits, _ = router.apply(
      {"params": params}, **{k: batch[k] for k in keys}, deterministic=deterministic, rngs={"dropout": rng}
    )
    return router_loss(logits, batch["label"], pos_weight)

  @jax.jit
  def step(params, opt_state, batch, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng, False)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  val_loss = jax.jit(lambda p, batch: loss_fn(p, batch, jax.random.key(0), True))
  val_batch = {k: jnp.asarray(val[k]) for k in (*keys, "label")}
  n = len(train["label"])
  rng = np.random.default_rng(seed)
  best, history = None, []
  for epoch in range(epochs):
    order = rng.permutation(n)
    losses = []
    for start in range(0, n - batch_size + 1, batch_size):
      idx = order[start : start + batch_size]
      batch = {k: jnp.asarray(train[k][idx]) for k in (*keys, "label")}
      params, opt_state, loss = step(params, opt_state, batch, jax.random.key(epoch * n + start))
      losses.append(float(loss))
    record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": float(val_loss(params, val_batch))}
    history.append(record)
    if best is None or record["val_loss"] < best[0]:
      best = (record["val_loss"], params)
  return {"params": best[1]}, history


def router_probs(router, variables, features, batch_size=4096):
  """sigmoid of the router over the feature dict `features`, numpy [n]."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  keys = ("hidden_states", "token_embeddings", "top_logits")
  apply = jax.jit(lambda v, f: jax.nn.sigmoid(router.apply(v, **f)[0]))
  n = len(features["label"])
  return np.concatenate(
    [
      np.asarray(apply(variables, {k: jnp.asarray(features[k][i : i + batch_size]) for k in keys}))
      for i in range(0, n, batch_size)
    ]
  )


def run(args):
  import numpy as np

  from zoo.engine import runs
  from zoo.engine.writers import read_config
  from zoo.models import build_model
  from zoo.routing import r2r

  if os.path.exists(os.path.join(args.out, r2r.ROUTER_JSON)) and not args.overwrite:
    raise ValueError(f"--out={args.out} already holds a trained router; allowed: a new directory, or --overwrite")
  small, small_vars = runs.load_lm_run(args.small)
  large, large_vars = runs.load_lm_run(args.large)
  if small.vocab_size != large.vocab_size:
    raise ValueError(
      f"the small model's vocabulary ({small.vocab_size}) differs from the large one's ({large.vocab_size})"
    )
  config = read_config(args.small)
  top_k = min(100, small.vocab_size)
  start = time.perf_counter()
  labels = {}
  for split, name, count in (
    ("train", config.data.train_split, args.train_prompts),
    ("val", config.data.eval_split, args.val_prompts),
  ):
    prompts = _prompts(config, name, count, args.prompt_len, args.seed)
    labels[split] = r2r.label_tokens(
      small,
      small_vars,
      large,
      large_vars,
      prompts,
      response_len=args.response_len,
      horizon=args.horizon,
      margin=args.margin,
      top_k=top_k,
    )
  label_seconds = time.perf_counter() - start
  stats = {split: label_stats(v) for split, v in labels.items()}
  scores = labels["train"]["score"][~labels["train"]["agree"]]
  router = build_model({"name": "r2r", "input_dim": small.embed_dim, "hidden_dim": args.hidden_dim, "top_k": top_k})
  start = time.perf_counter()
  variables, history = train_router(
    router, labels["train"], labels["val"], lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed
  )
  train_seconds = time.perf_counter() - start
  probs = {split: router_probs(router, variables, labels[split]) for split in labels}
  tau = r2r.choose_threshold(probs["val"], labels["val"]["label"], args.recall)
  quality = {}
  for split in labels:
    recall, rate = r2r.recall_and_rate(probs[split], labels[split]["label"], tau)
    quality[split] = {"recall": recall, "routed_rate": rate}
  best = min(history, key=lambda r: r["val_loss"])
  record = {
    "threshold": tau,
    "recall_target": args.recall,
    "small": args.small,
    "large": args.large,
    "labelling": {k: getattr(args, k) for k in LABELLING_KEYS},
    "labels": stats,
    "score_quantiles_of_disagreements": {q: float(np.quantile(scores, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
    "router_params": router.num_params(),
    "best_epoch": best["epoch"],
    "val_loss": best["val_loss"],
    "routing": quality,
    "label_seconds": label_seconds,
    "train_seconds": train_seconds,
  }
  r2r.save_router(args.out, router, variables, record)
  return record


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--small", required=True, help="workdir of the small LM run")
  parser.add_argument("--large", required=True, help="workdir of the large LM run (same tokenizer)")
  parser.add_argument("--out", required=True, help="directory for router.msgpack and router.json")
  parser.add_argument("--overwrite", action="store_true", help="replace the router already in --out")
  for name, default, kind in (
    ("train-prompts", 192, int),
    ("val-prompts", 64, int),
    ("prompt-len", 32, int),
    ("response-len", 64, int),
    ("horizon", 8, int),
    ("margin", 0.5, float),
    ("recall", 0.95, float),
    ("hidden-dim", 32, int),
    ("lr", 1e-3, float),
    ("epochs", 30, int),
    ("batch-size", 256, int),
    ("seed", 0, int),
  ):
    parser.add_argument(f"--{name}", type=kind, default=default)
  args = parser.parse_args(argv)
  try:
    record = run(args)
  except (FileNotFoundError, ValueError) as e:
    print(f"r2r: {e}", file=sys.stderr)
    sys.exit(2)
  for split, s in record["labels"].items():
    print(
      f"{split}: {s['tokens']} labelled tokens, small agrees with large on {s['agree_rate']:.3f}, "
      f"{s['divergent_of_disagreements']:.3f} of disagreements divergent, positive rate {s['positive_rate']:.3f}"
    )
  print(
    f"router: {record['router_params']} params, best epoch {record['best_epoch']}, val loss {record['val_loss']:.4f}"
  )
  for split, q in record["routing"].items():
    print(f"tau={record['threshold']:.4f} on {split}: recall {q['recall']:.3f}, routed {q['routed_rate']:.3f}")
  print(json.dumps(record))


if __name__ == "__main__":
  main()
