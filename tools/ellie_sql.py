"""EllieSQL: route text-to-SQL questions between pipelines of increasing cost and measure what each router buys
(`papers.md` C4, `zoo.routing.ellie_sql`).

  python train.py --config configs/sql_lm.py:small --workdir workdirs/sql_small
  python train.py --config configs/sql_lm.py:medium --workdir workdirs/sql_medium
  python tools/ellie_sql.py --small workdirs/sql_small --medium workdirs/sql_medium --out workdirs/ellie_sql

Runs the three pipelines (basic: small LM greedy; intermediate: medium LM greedy with up to 2 re-samples while the
SQL fails to run; advanced: medium LM, 8 candidates voted by execution result) on the held-out `validation` and `test`
questions of `text_to_sql`, scores them by execution match on the generated database, labels every question with
its cheapest correct pipeline, trains EllieSQL's routers on 2/3 of the validation questions (the other third is kept
for checks) and reports on the test questions, with the measured tokens, FLOPs and wall time of every pipeline:

- per pipeline: execution accuracy (EX), tokens, FLOPs and measured seconds per question, TEP against basic;
- per router: EX, tokens and FLOPs per question (and relative to advanced), TEP, the share of each pipeline, the
  random router's EX at the same FLOPs (interpolated on its curve between basic and the strongest pipeline);
- the oracle (cheapest correct pipeline per question) and each router's routing per level (one/two/three tables).

Writes DIR/results.json and DIR/cost_quality.png; refuses a DIR that already holds results unless --overwrite.
Bad input (a missing run, runs of another vocabulary or task): one line on stderr, exit code 2.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from zoo.engine.writers import format_or_dash as _fmt

RESULTS = "results.json"
PLOT = "cost_quality.png"
ROUTERS = ("rule", "label_knn", "classifier", "binary_cascade", "pairwise", "dpo_lm")


def router_prompt(question):
  """The DPO-trained router's prompt: the question at the SQL prompt's width, then 'PIPELINE: '."""
  from zoo.data.text_to_sql import QUESTION_WIDTH

  return f"Q: {question:<{QUESTION_WIDTH}}\nPIPELINE: "


def run(args):
  """Everything but the printing: the results dict (also written to DIR/results.json)."""
  from zoo.data import text_to_sql
  from zoo.engine import runs, writers
  from zoo.models import ConfigError
  from zoo.routing import cost_quality as cq, ellie_sql, model_routers

  if os.path.exists(os.path.join(args.out, RESULTS)) and not args.overwrite:
    raise ConfigError(f"--out={args.out} already holds {RESULTS}; allowed: a new directory, or --overwrite")
  pool = runs.load_pool(f"small={args.small},medium={args.medium}")
  for member in pool.members:
    if member.config.data.name != "text_to_sql":
      raise ConfigError(
        f"--{member.name}={member.workdir} was trained on {member.config.data.name!r}; allowed: text_to_sql runs "
        "(configs/sql_lm.py)"
      )
  models = {m.name: (m.model, m.variables) for m in pool.members}
  held_out = [q for q in text_to_sql.questions() if q["split"] in ("validation", "test")]
  if args.limit:
    held_out = [q for s in ("validation", "test") for q in [q for q in held_out if q["split"] == s][: args.limit]]
  questions, gold = [q["question"] for q in held_out], [q["sql"] for q in held_out]
  connection = text_to_sql.build_database()

  results, seconds = {}, {}
  for pipeline in ellie_sql.PIPELINES:
    start = time.perf_counter()
    results[pipeline.name] = ellie_sql.run_pipeline(
      pipeline, models, questions, gold, connection, seed=args.seed, batch_size=args.batch_size
    )
    seconds[pipeline.name] = (time.perf_counter() - start) / len(questions)
  small_model, small_variables = models["small"]
  prompts = ellie_sql.prompt_tokens(questions)
  features = ellie_sql.question_features(small_model, small_variables, prompts)
  seq_len = int(pool.members[0].config.data.seq_len)
  flops_per_token = {m.name: m.forward_flops_per_token(seq_len) for m in pool.members}
  data, data_flops = ellie_sql.routing_data(
    results,
    ellie_sql.PIPELINES,
    features=features,
    feature_tokens=np.full(len(questions), prompts.shape[1]),
    flops_per_token=flops_per_token,
    levels=[q["level"] for q in held_out],
    level_names=text_to_sql.LEVELS,
    complexity=[text_to_sql.tables_mentioned(q) for q in questions],
    router_tokens=ellie_sql.prompt_tokens(questions, text=router_prompt),
  )
  split = np.asarray([q["split"] for q in held_out])
  validation = np.flatnonzero(split == "validation")
  validation = validation[np.random.default_rng(args.seed).permutation(len(validation))]
  train_i, check_i = np.sort(validation[: 2 * len(validation) // 3]), np.sort(validation[2 * len(validation) // 3 :])
  test_i = np.flatnonzero(split == "test")
  train, check, test, test_flops = (
    data.subset(train_i),
    data.subset(check_i),
    data.subset(test_i),
    data_flops.subset(test_i),
  )

  names = data.members
  basic_ex, basic_tokens = float(test.quality[:, 0].mean()), float(test.cost[:, 0].mean())
  basic_flops = float(test_flops.cost[:, 0].mean())
  top_flops = float(test_flops.cost[:, -1].mean())
  random = model_routers.make_router("random").fit(train, seed=args.seed)
  random_curve = random.curve(test_flops)

  def summary(decision):
    ex = float(decision.quality(test).mean())
    tokens, flops = float(decision.cost(test).mean()), float(decision.cost(test_flops).mean())
    order = np.argsort(random_curve[:, 1], kind="stable")
    return {
      "ex": ex,
      "tokens": tokens,
      "flops": flops,
      "flops_rel": flops / top_flops,
      "tep_tokens": ellie_sql.tep(ex, tokens, basic_ex, basic_tokens),
      "tep_flops": ellie_sql.tep(ex, flops, basic_ex, basic_flops),
      "share": (np.bincount(decision.choice, minlength=len(names)) / len(test)).tolist(),
      "random_ex_same_flops": float(np.interp(flops, random_curve[order, 1], random_curve[order, 2])),
      "by_level": {
        level: {
          "share": (np.bincount(decision.choice[test.category == k], minlength=len(names)) / count).tolist(),
          "ex": float(decision.quality(test)[test.category == k].mean()),
        }
        for k, level in enumerate(text_to_sql.LEVELS)
        if (count := int(np.sum(test.category == k)))
      },
    }

  out = {
    "small": args.small,
    "medium": args.medium,
    "questions": {"router_train": len(train), "router_check": len(check), "test": len(test)},
    "members": {
      m.name: {"params": m.num_params, "step": m.step, "flops_per_token": flops_per_token[m.name]} for m in pool.members
    },
    "pipelines": {},
    "labels_test": (np.bincount(model_routers.cheapest_sufficient(test.quality), minlength=len(names)) / len(test))
    .round(4)
    .tolist(),
    "routers": {},
  }
  for j, pipeline in enumerate(ellie_sql.PIPELINES):
    fixed = np.full(len(test), j)
    out["pipelines"][pipeline.name] = {
      **summary(model_routers.Decision(fixed, model_routers.one_member(fixed, len(names)), uses_features=False)),
      "member": pipeline.member,
      "seconds": seconds[pipeline.name],
      "calls": float(results[pipeline.name].calls[test_i].mean()),
    }
  oracle = model_routers.make_router("oracle").route(test, np.inf)
  out["routers"]["oracle"] = {"family": "baseline", **summary(oracle)}
  for name in args.routers:
    options = {"model": small_model, "variables": small_variables} if name == "dpo_lm" else {}
    router = model_routers.make_router(name, **options).fit(train, seed=args.seed)
    decision = router.route(test, router.knobs()[0])
    check_decision = router.route(check, router.knobs()[0])
    out["routers"][name] = {
      "family": router.family,
      **summary(decision),
      "label_accuracy": float(np.mean(decision.choice == model_routers.cheapest_sufficient(test.quality))),
      "check_ex": float(check_decision.quality(check).mean()),
    }

  os.makedirs(args.out, exist_ok=True)
  curves = {"random": (random_curve[:, 1] / top_flops, random_curve[:, 2])}
  curves.update({n: ([r["flops_rel"]], [r["ex"]]) for n, r in out["routers"].items()})
  out["plot"] = cq.plot_cost_quality(
    curves,
    {n: (p["flops_rel"], p["ex"]) for n, p in out["pipelines"].items()},
    os.path.join(args.out, PLOT),
    xlabel="FLOPs per question / advanced pipeline's",
    ylabel="test execution accuracy",
  )
  with open(os.path.join(args.out, RESULTS), "w") as f:
    json.dump(writers.without_nan(out), f, indent=1, allow_nan=False)
  return out


def report(out):
  """The markdown tables of `out`."""
  names = list(out["pipelines"])
  lines = [
    f"questions: {out['questions']}; test labels (cheapest correct pipeline) "
    + ", ".join(f"{n} {s:.3f}" for n, s in zip(names, out["labels_test"])),
    "",
    "| pipeline | member | LM calls / q | EX | tokens / q | GFLOPs / q | FLOPs / advanced | seconds / q (measured) | "
    "TEP tokens | TEP FLOPs |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for n, p in out["pipelines"].items():
    lines.append(
      f"| {n} | {p['member']} | {p['calls']:.2f} | {p['ex']:.3f} | {p['tokens']:.0f} | {p['flops'] / 1e9:.3f} | "
      f"{p['flops_rel']:.3f} | {p['seconds']:.4f} | {_fmt(p['tep_tokens'])} | {_fmt(p['tep_flops'])} |"
    )
  lines += [
    "",
    "| router | family | EX | random EX at same FLOPs | tokens / q | FLOPs / advanced | TEP tokens | TEP FLOPs | "
    "label acc. | share " + "/".join(names) + " |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
  ]
  for n, r in out["routers"].items():
    lines.append(
      f"| {n} | {r['family']} | {r['ex']:.3f} | {r['random_ex_same_flops']:.3f} | {r['tokens']:.0f} | "
      f"{r['flops_rel']:.3f} | {_fmt(r['tep_tokens'])} | {_fmt(r['tep_flops'])} | {_fmt(r.get('label_accuracy'))} | "
      + "/".join(f"{s:.2f}" for s in r["share"])
      + " |"
    )
  lines += ["", "| router | level: EX, share " + "/".join(names) + " |", "|---|---|"]
  for n, r in out["routers"].items():
    cells = [f"{k} {v['ex']:.2f}, " + "/".join(f"{s:.2f}" for s in v["share"]) for k, v in r["by_level"].items()]
    lines.append(f"| {n} | " + "; ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--small", required=True, help="the small SQL LM's run directory")
  parser.add_argument("--medium", required=True, help="the medium SQL LM's run directory")
  parser.add_argument("--out", required=True, help="the directory for results.json and cost_quality.png")
  parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
  parser.add_argument("--routers", default=",".join(ROUTERS))
  parser.add_argument("--limit", type=int, default=0, help="questions per held-out split (0: all)")
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  from zoo.engine import cli
  from zoo.routing import ellie_sql, model_routers

  del ellie_sql  # registers 'dpo_lm'
  with cli.one_line_errors():
    args.routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    for name in args.routers:
      model_routers.MODEL_ROUTERS.get(name)
    if args.limit < 0 or args.batch_size < 1:
      raise ValueError(f"--limit={args.limit} must be >= 0 and --batch_size={args.batch_size} >= 1")
    out = run(args)
  print(report(out))
  print(f"\nwrote {os.path.join(args.out, RESULTS)} and {out['plot']}")


if __name__ == "__main__":
  sys.exit(main())
