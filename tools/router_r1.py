"""Train Router-R1 (`zoo.routing.router_r1`, `papers.md` C2) on a pool's routing data and compare it on the test
queries with the members alone, the random router and the oracle.

  python tools/route_models.py --pool workdirs/pool_small,workdirs/pool_medium,workdirs/pool_large --out DIR
  python tools/router_r1.py --routing DIR [--cost_weights 0,0.5,0.9] [--steps 150]

Reads what `tools/route_models.py` wrote to DIR: `queries.npz` (per query and member: quality and confidence in pool
order, measured cost in cost order, the features, the train / validation / test split) and `results.json` (the
members' measured seconds per token, which fix the cost order, the quality measure and the categories). Trains one
policy (conditioned on the cost weight a) on the train split and, for every a, decodes the test queries greedily and
reports: test quality, measured cost relative to the strongest member, the share of each member, the valid-format and
correct rates, the mean reward; next to them the cheapest member, the strongest, the random router at the same cost
(RouteLLM's random router, interpolated) and the oracle (the best quality reachable at no more than that cost, and
its best quality overall); then APGR, CPT(50%) and AIQ of Router-R1's points (`zoo.routing.cost_quality`).
Prints a markdown table and, as its last line, the JSON of the results (also written to `--out` when given).
Bad input: one line on stderr, exit code 2.
"""

import argparse
import json
import os
import sys

import numpy as np


def load_routing(directory, quality=None):
  """The `RoutingData` of `tools/route_models.py`'s output DIR and its (train, validation, test) index arrays.

  Args:
    quality: 'neg_loss' or 'accuracy'; None: the one DIR's results were computed with.
  """
  from zoo.models import ConfigError
  from zoo.routing.model_routers import RoutingData

  paths = [os.path.join(directory, name) for name in ("queries.npz", "results.json")]
  for path in paths:
    if not os.path.exists(path):
      raise ConfigError(f"--routing={directory}: {path} is missing; allowed: a directory written by route_models.py")
  z = np.load(paths[0])
  with open(paths[1]) as f:
    results = json.load(f)
  quality = quality or results["quality"]
  if quality not in ("neg_loss", "accuracy"):
    raise ConfigError(f"--quality={quality!r}; allowed: 'neg_loss', 'accuracy'")
  names = [str(n) for n in z["members"]]
  order = np.argsort([results["members"][n]["seconds_per_token"] for n in names], kind="stable")
  data = RoutingData(
    quality=z[quality][:, order],
    cost=z["cost_seconds"],
    features=z["features"],
    feature_cost=z["feature_cost_seconds"],
    confidence=z["confidence"][:, order],
    category=z["category"],
    members=tuple(names[i] for i in order),
    categories=tuple(results["categories"]),
  )
  return data, (z["train"], z["validation"], z["test"]), quality


def evaluate(routers, test, weak, strong):
  """Rows per cost weight and the curve metrics of Router-R1 on `test` (module docstring).

  Args:
    routers: [(fitted RouterR1, cost weight a)].
  """
  from zoo.routing import cost_quality as cq, model_routers as mr, router_r1 as r1

  member_cost, member_quality = test.member_cost(), test.quality.mean(axis=0)
  ref = member_cost[strong]
  oracle = mr.make_router("oracle").fit(test).curve(test)  # [K, 3]: knob, mean cost, mean quality
  rows = []
  for router, a in routers:
    ep, parsed = router.decode(test, a)
    decision = router.route(test, a)
    cost, quality = float(decision.cost(test).mean()), float(decision.quality(test).mean())
    rewards = r1.episode_rewards(parsed, test.quality, test.cost, a, router.margin)
    rows_q = np.arange(len(test))
    best = test.quality.max(axis=1)
    correct = test.quality[rows_q, decision.choice] >= best - router.margin
    # RouteLLM's random router at the same cost: strong with probability p, weak otherwise.
    p = np.clip((cost - member_cost[weak]) / (member_cost[strong] - member_cost[weak]), 0.0, 1.0)
    reachable = oracle[oracle[:, 1] <= cost * (1 + 1e-9)]
    rows.append(
      {
        "cost_weight": float(a),
        "test_quality": quality,
        "cost_rel": cost / ref,
        "member_share": (np.bincount(decision.choice, minlength=len(test.members)) / len(test)).tolist(),
        "members_run": float(decision.ran.sum(axis=1).mean()),
        "valid": float(parsed.valid.mean()),
        "correct": float(correct.mean()),
        "reward": float(rewards.mean()),
        "random_same_cost": float(member_quality[weak] + p * (member_quality[strong] - member_quality[weak])),
        "oracle_same_cost": float(reachable[:, 2].max()) if len(reachable) else None,
        "example": router.vocab.render(ep.tokens[0], test.members),
      }
    )
  costs = np.array([r["cost_rel"] * ref for r in rows])
  quals = np.array([r["test_quality"] for r in rows])
  weak_pt = (float(member_cost[weak]), float(member_quality[weak]))
  strong_pt = (float(ref), float(member_quality[strong]))
  curve = {"aiq": cq.aiq(costs, quals, cost_range=(weak_pt[0], ref), anchor=weak_pt)}
  if strong_pt[1] > weak_pt[1]:
    curve["apgr"] = cq.apgr(costs, quals, weak=weak_pt, strong=strong_pt)
    curve["cpt50"] = cq.cpt(costs, quals, 0.5, weak=weak_pt, strong=strong_pt)
    curve["oracle_apgr"] = cq.apgr(oracle[:, 1], oracle[:, 2], weak=weak_pt, strong=strong_pt)
  curve["oracle_aiq"] = cq.aiq(oracle[:, 1], oracle[:, 2], cost_range=(weak_pt[0], ref), anchor=weak_pt)
  return rows, curve


def run(args):
  from zoo.models import ConfigError
  from zoo.routing import router_r1 as r1

  try:
    weights = tuple(float(a) for a in args.cost_weights.split(",") if a.strip())
  except ValueError:
    raise ConfigError(f"--cost_weights={args.cost_weights!r}; allowed: comma-separated numbers in [0, 1]") from None
  data, (train_i, val_i, test_i), quality = load_routing(args.routing, args.quality)
  train, test = data.subset(train_i), data.subset(test_i)
  if args.advantages not in ("grpo", "drgrpo"):
    raise ConfigError(f"--advantages={args.advantages!r}; allowed: 'grpo', 'drgrpo'")
  options = dict(
    steps=args.steps,
    format_warmup_steps=args.warmup,
    queries_per_step=args.queries_per_step,
    group_size=args.group_size,
    correct_margin=args.margin,
    lr=args.lr,
    scale_advantages=args.advantages == "grpo",
  )
  if args.per_weight:  # the paper's setting: one policy per cost weight
    fitted = [(r1.RouterR1(cost_weights=(a,), **options).fit(train, seed=args.seed), a) for a in weights]
  else:
    router = r1.RouterR1(cost_weights=weights, **options).fit(train, seed=args.seed)
    fitted = [(router, a) for a in weights]
  router = fitted[0][0]
  member_cost, member_quality = test.member_cost(), test.quality.mean(axis=0)
  weak = 0
  strong = 1 + int(np.argmax(member_quality[1:]))
  rows, curve = evaluate(fitted, test, weak, strong)
  hist = router.history
  return {
    "routing": args.routing,
    "quality": quality,
    "advantages": args.advantages,
    "per_weight": bool(args.per_weight),
    "queries": {"train": len(train_i), "validation": len(val_i), "test": len(test_i)},
    "margin": router.margin,
    "members": {
      n: {"test_quality": float(member_quality[j]), "cost_rel": float(member_cost[j] / member_cost[strong])}
      for j, n in enumerate(test.members)
    },
    "strong_member": test.members[strong],
    "train_reward_first10": float(np.mean([h["reward"] for h in hist[:10]])) if hist else None,
    "train_reward_last10": float(np.mean([h["reward"] for h in hist[-10:]])) if hist else None,
    "train_valid_last10": float(np.mean([h["valid"] for h in hist[-10:]])) if hist else None,
    "rows": rows,
    "curve": curve,
  }


def report(res):
  lines = [f"test quality ({res['quality']}) and measured cost / {res['strong_member']}'s; margin {res['margin']:.4f}"]
  lines += ["", "| member | test quality | cost / strong |", "|---|---:|---:|"]
  for n, m in res["members"].items():
    lines.append(f"| {n} | {m['test_quality']:.4f} | {m['cost_rel']:.3f} |")
  members = "/".join(res["members"])
  lines += [
    "",
    f"| a | test quality | cost / strong | share {members} | members run | valid | correct | reward | random @cost "
    "| oracle @cost |",
    "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in res["rows"]:
    oracle = "-" if r["oracle_same_cost"] is None else f"{r['oracle_same_cost']:.4f}"
    share = "/".join(f"{s:.2f}" for s in r["member_share"])
    lines.append(
      f"| {r['cost_weight']:.2f} | {r['test_quality']:.4f} | {r['cost_rel']:.3f} | {share} | "
      f"{r['members_run']:.2f} | {r['valid']:.2f} | {r['correct']:.2f} | {r['reward']:.3f} | "
      f"{r['random_same_cost']:.4f} | {oracle} |"
    )
  lines += ["", "curve: " + ", ".join(f"{k} {v:.4f}" for k, v in res["curve"].items())]
  lines += [
    f"advantages {res['advantages']}, one policy per a: {res['per_weight']}; train reward (first policy): first 10 "
    f"steps {res['train_reward_first10']:.4f}, last 10 {res['train_reward_last10']:.4f}"
  ]
  lines += [f"example (a={res['rows'][0]['cost_weight']}): {res['rows'][0]['example']}"]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--routing", required=True, help="a directory written by tools/route_models.py")
  parser.add_argument("--cost_weights", default="0,0.5,0.9")
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--warmup", type=int, default=200)
  parser.add_argument("--queries_per_step", type=int, default=32)
  parser.add_argument("--group_size", type=int, default=8)
  parser.add_argument("--lr", type=float, default=1e-3, help="GRPO's learning rate")
  parser.add_argument("--advantages", default="grpo", help="'grpo' (divided by the group std) or 'drgrpo' (centred)")
  parser.add_argument(
    "--per_weight", action="store_true", help="one policy per cost weight (else one conditioned on a)"
  )
  parser.add_argument("--margin", type=float, default=None, help="correct_margin (default: from the train split)")
  parser.add_argument("--quality", default=None, help="'neg_loss' or 'accuracy' (default: the routing data's)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="a JSON file for the results")
  args = parser.parse_args(argv)
  from zoo.engine import cli

  with cli.one_line_errors():
    res = run(args)
  print(report(res))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)
  print(json.dumps({k: v for k, v in res.items() if k != "rows"} | {"rows": res["rows"]}))


if __name__ == "__main__":
  sys.exit(main())
