"""Route queries between whole trained models and measure what each router buys (`papers.md` C1-C5).

  python tools/route_models.py --pool workdirs/pool_small,workdirs/pool_medium,workdirs/pool_large --out DIR

Loads the pool (`zoo.routing.model_pool`: each run's config and latest checkpoint), measures every member's tokens
per second in this one run (median of `--repeats` forwards over the same batch, after compilation) next to its
analytic forward FLOPs, scores every member on `--queries` windows of the corpus's held-out split (`--prompt_len`
prompt + `--continuation_len` continuation tokens; quality = the negative mean next-token loss on the continuation,
or `--quality accuracy`, the teacher-forced next-token accuracy), splits the queries at random into router train /
validation / test (50/25/25 [guess]), fits every router of `zoo.routing.model_routers` on train, picks each router's
knob on validation for every budget of `--budgets` (fractions of the strongest member's measured cost per query) and
reports on test:

- the members: parameters, forward FLOPs per token, measured tokens per second, test quality;
- per router: family, timing, APGR, CPT(50%), CPT(80%) (cost fraction of the strongest member), AIQ over its whole
  test curve (`zoo.routing.cost_quality`);
- per router and budget: the chosen knob, test quality, measured cost and FLOPs relative to the strongest member;
- per category (the corpus's domain): the share of queries each router sends to each member at the middle budget.

Why the loss by default: over 64 continuation bytes a member's accuracy moves in steps of 1/64 and the members often
tie, so which member wins a query is mostly noise; the loss is continuous, and the gap between two members' losses is
what the routers' features can predict (on the small/medium pool, a ridge regression from the features predicts the
loss gap with a validation correlation of 0.16 and the accuracy gap with 0.02).

Writes DIR/cost_quality.png (every router's test curve with the members), DIR/results.json and DIR/queries.npz
(every query's per-member scores and costs, features and split, for further analysis); refuses a DIR that
already holds results unless `--overwrite`. Bad input: one line on stderr, exit code 2.
"""

import argparse
import json
import os
import sys

import numpy as np

from zoo.engine.writers import format_or_dash as _fmt

RESULTS = "results.json"
PLOT = "cost_quality.png"
QUERIES = "queries.npz"  # per-query scores (members in pool order), costs (members in cost order) and the splits
DEFAULT_ROUTERS = ("random", "oracle", "knn", "mlp", "preference", "cascade", "composition")


def _parse_budgets(text):
  from zoo.models import ConfigError

  try:
    budgets = [float(b) for b in text.split(",") if b.strip()]
  except ValueError:
    raise ConfigError(f"--budgets={text!r}: allowed: comma-separated positive numbers (fractions)") from None
  if not budgets or min(budgets) <= 0:
    raise ConfigError(f"--budgets={text!r}: allowed: comma-separated positive numbers (fractions)")
  return budgets


def run(args):
  """Everything but the printing: returns the results dict (also written to DIR/results.json)."""
  from zoo.engine import runs, writers
  from zoo.models import ConfigError
  from zoo.routing import cost_quality as cq, model_pool, model_routers, router_r1  # router_r1 registers it

  del router_r1

  budgets = _parse_budgets(args.budgets)
  routers = [r.strip() for r in args.routers.split(",") if r.strip()]
  for name in routers:
    model_routers.MODEL_ROUTERS.get(name)
  if os.path.exists(os.path.join(args.out, RESULTS)) and not args.overwrite:
    raise ConfigError(f"--out={args.out} already holds {RESULTS}; allowed: a new directory, or --overwrite")
  pool = runs.load_pool(args.pool)
  first = pool.members[0].config
  tokens, category, categories = model_pool.corpus_queries(
    first.data,
    prompt_len=args.prompt_len,
    continuation_len=args.continuation_len,
    max_queries=args.queries,
    seed=args.seed,
  )
  query_len = args.prompt_len + args.continuation_len
  costs = model_pool.measure_costs(pool, tokens[: args.batch_size], repeats=args.repeats)
  scores = model_pool.score_queries(pool, tokens, args.prompt_len, batch_size=args.batch_size)
  common = dict(prompt_len=args.prompt_len, query_len=query_len, quality=args.quality)
  data = model_pool.routing_data(pool, costs, scores, category, categories, unit="seconds", **common)
  flops = model_pool.routing_data(pool, costs, scores, category, categories, unit="flops", **common)
  train_i, val_i, test_i = model_pool.split_queries(len(data), seed=args.seed)
  train, val, test = data.subset(train_i), data.subset(val_i), data.subset(test_i)
  test_flops = flops.subset(test_i)

  member_cost, member_quality = test.member_cost(), test.quality.mean(axis=0)
  # The strong member: the best on test among those costlier than the cheapest (the weak member).
  strong = 1 + int(np.argmax(member_quality[1:]))
  recoverable = member_quality[strong] > member_quality[0]  # else PGR, APGR and CPT are undefined (nan)
  weak_pt = (float(member_cost[0]), float(member_quality[0]))
  strong_pt = (float(member_cost[strong]), float(member_quality[strong]))
  ref_cost, ref_flops = strong_pt[0], float(test_flops.member_cost()[strong])
  members = {}
  for j, name in enumerate(data.members):
    c = costs[name]
    members[name] = {
      "params": c.params,
      "flops_per_token": c.flops_per_token,
      "tokens_per_second": c.tokens_per_second,
      "seconds_per_token": c.seconds_per_token,
      "timings": list(c.timings),
      "step": pool.member(name).step,
      "test_quality": float(member_quality[j]),
      "cost_rel": float(member_cost[j] / ref_cost),
    }

  results = {
    "pool": [f"{m.name}={m.workdir}" for m in pool.members],
    "quality": args.quality,
    "queries": {"total": len(data), "train": len(train), "validation": len(val), "test": len(test)},
    "prompt_len": args.prompt_len,
    "continuation_len": args.continuation_len,
    "strong_member": data.members[strong],
    "gap_recoverable": bool(recoverable),
    "weak_member": data.members[0],
    "categories": list(categories),
    "test_category_counts": np.bincount(test.category, minlength=len(categories)).tolist(),
    "members": members,
    "routers": {},
  }
  curves, nan = {}, float("nan")
  middle = budgets[len(budgets) // 2]
  for name in routers:
    router = model_routers.make_router(name).fit(train, seed=args.seed)
    curve = router.curve(test)
    curves[name] = (curve[:, 1] / ref_cost, curve[:, 2])
    entry = {
      "family": router.family,
      "timing": router.timing,
      "knob": router.knob_name,
      "apgr": cq.apgr(curve[:, 1], curve[:, 2], weak=weak_pt, strong=strong_pt) if recoverable else nan,
      "cpt50": cq.cpt(curve[:, 1], curve[:, 2], 0.5, weak=weak_pt, strong=strong_pt) if recoverable else nan,
      "cpt80": cq.cpt(curve[:, 1], curve[:, 2], 0.8, weak=weak_pt, strong=strong_pt) if recoverable else nan,
      "aiq": cq.aiq(curve[:, 1], curve[:, 2], cost_range=(weak_pt[0], ref_cost), anchor=weak_pt),
      "curve": curve.tolist(),
      "budgets": [],
    }
    for fraction in budgets:
      row = {"budget": fraction}
      try:
        knob = model_routers.choose_threshold(router, val, fraction * ref_cost)
      except ConfigError as e:
        row["infeasible"] = str(e)
        entry["budgets"].append(row)
        continue
      decision = router.route(test, knob)
      quality = float(decision.quality(test).mean())
      row.update(
        knob=knob,
        test_quality=quality,
        cost_rel=float(decision.cost(test).mean() / ref_cost),
        flops_rel=float(decision.cost(test_flops).mean() / ref_flops),
        pgr=float(cq.pgr(quality, weak_pt[1], strong_pt[1])) if recoverable else nan,
        member_share=np.bincount(decision.choice, minlength=len(data.members)).astype(float).tolist(),
      )
      row["member_share"] = [s / len(test) for s in row["member_share"]]
      if fraction == middle:
        table = cq.category_table(decision.choice, test.category, len(data.members), len(categories))
        entry["category_table"] = {c: dict(zip(data.members, table[k].tolist())) for k, c in enumerate(categories)}
      entry["budgets"].append(row)
    results["routers"][name] = entry

  os.makedirs(args.out, exist_ok=True)
  results["plot"] = cq.plot_cost_quality(
    {n: c for n, c in curves.items()},
    {n: (m["cost_rel"], m["test_quality"]) for n, m in members.items()},
    os.path.join(args.out, PLOT),
    xlabel=f"measured cost per query / {data.members[strong]}'s",
    ylabel=f"test {args.quality}",
    budgets=budgets,
  )
  np.savez_compressed(
    os.path.join(args.out, QUERIES),
    **{k: v for k, v in scores.items()},
    cost_seconds=data.cost,
    cost_flops=flops.cost,
    feature_cost_seconds=data.feature_cost,
    category=category,
    train=train_i,
    validation=val_i,
    test=test_i,
    members=np.asarray(pool.names),
  )
  results = writers.without_nan(results)
  with open(os.path.join(args.out, RESULTS), "w") as f:
    json.dump(results, f, indent=1)
  return results


def report(results):
  """The markdown tables of `results`."""
  lines = [
    f"queries: {results['queries']} (prompt {results['prompt_len']} + continuation {results['continuation_len']} "
    f"tokens); quality: {results['quality']}; strong member: {results['strong_member']}",
    "",
    "| member | step | params | forward FLOPs/token | tokens/s (measured) | test quality | cost / strong |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for name, m in results["members"].items():
    lines.append(
      f"| {name} | {m['step']} | {m['params']:,} | {m['flops_per_token']:.3g} | {m['tokens_per_second']:.4g} | "
      f"{m['test_quality']:.4f} | {m['cost_rel']:.3f} |"
    )
  lines += [
    "",
    "| router | family | timing | APGR | CPT(50%) | CPT(80%) | AIQ |",
    "|---|---|---|---:|---:|---:|---:|",
  ]
  for name, r in results["routers"].items():
    lines.append(
      f"| {name} | {r['family']} | {r['timing']} | {_fmt(r['apgr'])} | {_fmt(r['cpt50'])} | {_fmt(r['cpt80'])} | "
      f"{_fmt(r['aiq'], '.4f')} |"
    )
  members = list(results["members"])
  lines += [
    "",
    "| router | budget | knob | test quality | PGR | cost / strong | FLOPs / strong | share "
    + "/".join(members)
    + " |",
    "|---|---:|---:|---:|---:|---:|---:|---|",
  ]
  for name, r in results["routers"].items():
    for row in r["budgets"]:
      if "infeasible" in row:
        lines.append(f"| {name} | {row['budget']:.2f} | - | below the router's cheapest validation cost | | | | |")
        continue
      share = "/".join(f"{s:.2f}" for s in row["member_share"])
      lines.append(
        f"| {name} | {row['budget']:.2f} | {row['knob']:.4g} | {row['test_quality']:.4f} | {_fmt(row['pgr'])} | "
        f"{row['cost_rel']:.3f} | {row['flops_rel']:.3f} | {share} |"
      )
  counts = dict(zip(results["categories"], results["test_category_counts"]))
  lines += ["", "share of each category's test queries per member (middle budget):", ""]
  lines += ["| router | category (test queries) | " + " | ".join(members) + " |", "|---|---|" + "---:|" * len(members)]
  for name, r in results["routers"].items():
    for category, shares in r.get("category_table", {}).items():
      if counts[category]:
        lines.append(
          f"| {name} | {category} ({counts[category]}) | " + " | ".join(f"{shares[m]:.2f}" for m in members) + " |"
        )
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--pool", required=True, help="NAME=DIR or DIR, comma-separated (two or more runs)")
  parser.add_argument("--out", required=True, help="the directory for results.json and cost_quality.png")
  parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
  parser.add_argument("--queries", type=int, default=1024)
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--continuation_len", type=int, default=64)
  parser.add_argument("--quality", default="neg_loss", help="'neg_loss' or 'accuracy'")
  parser.add_argument("--budgets", default="0.1,0.25,0.5,0.75", help="fractions of the strongest member's cost")
  parser.add_argument("--routers", default=",".join(DEFAULT_ROUTERS))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  from zoo.engine import cli

  with cli.one_line_errors():
    if args.queries < 8 or args.batch_size < 1:
      raise ValueError(f"--queries={args.queries} must be >= 8 and --batch_size={args.batch_size} >= 1")
    results = run(args)
  print(report(results))
  print(f"\nwrote {os.path.join(args.out, RESULTS)} and {results['plot']}")


if __name__ == "__main__":
  sys.exit(main())
