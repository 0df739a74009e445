"""Duo-LLM route quality (papers.md A6; Alizadeh et al. 2024, Sec. 4-5): trained router vs oracle vs random routes.

  python tools/duo_llm_compare.py --workdir workdirs/duo_llm_router [--batches 2] [--samples 32]

Loads the run in `--workdir` (its `config.json` and latest checkpoint; a `duo_llm` model, normally trained with
`configs/duo_llm_router.py`) and scores `--batches` validation batches of 8 sequences with the same weights under:
the trained routers (at most `big_budget` big layers per token), the oracle (per token the best of `--samples`
sampled routes with exactly `big_budget` big layers, `zoo.models.duo_llm.oracle_routes`), random routes with exactly
`big_budget` big layers (the mean over the samples), and every layer big / small / skipped. Prints a markdown table
of the mean token loss and the mean big layers per token.
"""

import argparse
import sys


def compare(workdir, *, batches=2, samples=32, batch_size=8, seed=0):
  """{row name: (mean token loss, mean big layers per token)} for the run in `workdir`."""
  import jax
  import jax.numpy as jnp
  import optax

  from zoo.data import make_iterator
  from zoo.engine.checkpoint import restore_variables
  from zoo.engine.trainer import Experiment
  from zoo.engine.writers import read_config
  from zoo.models.duo_llm import BIG, oracle_routes, token_losses

  config = read_config(workdir)
  if config.model.name != "duo_llm":
    raise ValueError(f"{workdir} trained {config.model.name!r}; duo_llm_compare needs a 'duo_llm' run")
  exp = Experiment(config)
  variables = restore_variables(workdir, exp.abstract_state()[0].variables())
  model = exp.model.clone(route_mode="router")
  budget = model.big_budget or model.num_layers
  it = make_iterator(config.data, split=config.data.eval_split, global_batch_size=batch_size, seed=seed, repeat=False)
  sums = {}

  def add(name, losses, big, mask):
    loss_sum, big_sum, count = sums.get(name, (0.0, 0.0, 0.0))
    sums[name] = (
      loss_sum + float(jnp.sum(losses * mask)),
      big_sum + float(jnp.sum(big * mask)),
      count + float(mask.sum()),
    )

  routed_losses = jax.jit(lambda tokens, targets, routes: token_losses(model, variables, tokens, targets, routes))
  router_apply = jax.jit(lambda tokens: model.apply(variables, tokens))
  for b in range(batches):
    batch = next(it)
    tokens, targets, mask = (jnp.asarray(batch[k]) for k in ("inputs", "targets", "mask"))
    logits, out = router_apply(tokens)
    router_losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    # The router's big layers per token: the batch mean (padding rows included), the others' are exact.
    add("trained router", router_losses, jnp.full(tokens.shape, out.metrics["big_layers"]), mask)
    oracle = oracle_routes(
      model, variables, tokens, targets, big_layers=budget, num_samples=samples, rng=jax.random.key(seed + b)
    )
    add(
      f"oracle (best of {samples})",
      routed_losses(tokens, targets, oracle["routes"]),
      jnp.full(tokens.shape, budget),
      mask,
    )
    add("random routes", jnp.mean(oracle["sample_losses"], axis=0), jnp.full(tokens.shape, budget), mask)
    for route, name in ((BIG, "all big"), (1, "all small"), (0, "all skip")):
      routes = jnp.full(tokens.shape + (model.num_layers,), route, jnp.int32)
      add(
        name,
        routed_losses(tokens, targets, routes),
        jnp.full(tokens.shape, model.num_layers if route == BIG else 0),
        mask,
      )
  return {name: (loss / count, big / count) for name, (loss, big, count) in sums.items()}, budget


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--batches", type=int, default=2)
  parser.add_argument("--samples", type=int, default=32)
  args = parser.parse_args(argv)
  try:
    rows, budget = compare(args.workdir, batches=args.batches, samples=args.samples)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"duo_llm_compare: {e}")
  print(f"budget: {budget} big layers per token; {args.batches} validation batches of 8 sequences\n")
  print("| routes | mean token loss | big layers per token |")
  print("|---|---:|---:|")
  for name, (loss, big) in rows.items():
    print(f"| {name} | {loss:.4f} | {big:.2f} |")


if __name__ == "__main__":
  main()
