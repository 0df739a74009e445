"""EllieSQL (`papers.md` C4): the generated text-to-SQL data (`zoo.data.text_to_sql`), the pipelines, votes, DPO
pairs, TEP and the DPO-trained LM router (`zoo.routing.ellie_sql`), and the tool end to end (`tools/ellie_sql.py`) on
tiny randomly initialised LMs."""

import collections
import dataclasses
import json
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_engine import tiny_config
from test_model_pool import member_config, write_run
from tools import ellie_sql as tool
from zoo.data import text_to_sql as t2s
from zoo.data.tokenizer import ByteTokenizer
from zoo.models import ConfigError, build_model
from zoo.routing import ellie_sql
from zoo.routing.model_routers import RoutingData, cheapest_sufficient, make_router

TABLES = ("employees", "departments", "projects", "assignments")


@pytest.fixture(scope="module")
def connection():
  return t2s.build_database()


@pytest.fixture(scope="module")
def questions():
  return t2s.questions()


def tiny_lm(embed_dim=16, seed=0):
  """A 1-layer byte LM (vocab 259) with random parameters."""
  config = tiny_config()
  config.model.update(num_layers=1, embed_dim=embed_dim, mlp_dim=2 * embed_dim)
  model = build_model(config.model)
  variables = nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32)))
  return model, variables


@pytest.fixture(scope="module")
def lm16():
  return tiny_lm(16)


# ----------------------------------------------------------------------------------------------------------- data


def test_database_rows_are_deterministic_and_seeded():
  a, b = t2s.database_rows.__wrapped__(0), t2s.database_rows.__wrapped__(0)
  assert a == b
  assert t2s.database_rows.__wrapped__(1) != a
  sizes = {t: len(rows) for t, rows in a.items()}
  assert sizes == {"departments": 8, "employees": t2s.NUM_EMPLOYEES, "projects": 24, "assignments": 700}
  pairs = [(e, p) for e, p, _ in a["assignments"]]
  assert len(set(pairs)) == len(pairs)  # an employee logs hours on a project once
  assert all(1 <= e <= t2s.NUM_EMPLOYEES and 1 <= p <= 24 for e, p in pairs)  # foreign keys point at rows
  assert all(1 <= row[4] <= 8 for row in a["employees"] + a["projects"])


def test_questions_splits_levels_and_gold_sql(questions, connection):
  texts = [q["question"] for q in questions]
  assert len(set(texts)) == len(texts)  # so no question text is in two splits
  assert {q["split"] for q in questions} == {"train", "validation", "test"}
  by_split = {s: {q["question"] for q in questions if q["split"] == s} for s in ("train", "validation", "test")}
  assert sum(map(len, by_split.values())) == len(questions)
  assert not (by_split["train"] & by_split["test"]) and not (by_split["validation"] & by_split["test"])
  counts = collections.Counter((q["split"], q["level"]) for q in questions)
  for split, n in t2s.HELD_OUT.items():
    assert [counts[split, level] for level in range(3)] == [n] * 3
  assert all(counts["train", level] > 0 for level in range(3))
  assert all(counts.get(("train", level), 0) + 2 * 200 <= t2s.PER_LEVEL for level in range(3))
  for q in questions:
    assert len(q["question"]) <= t2s.QUESTION_WIDTH and len(q["sql"]) <= t2s.SQL_MAX_CHARS
    rows = t2s.run_sql(connection, q["sql"])
    assert rows and rows != ((None,),), q["sql"]
    # The level is the number of tables the gold query joins, less one.
    assert sum(re.search(rf"\b{t}\b", q["sql"]) is not None for t in TABLES) == q["level"] + 1, q["sql"]
    # The LMs' SQL takes the linked values as parameters and returns the gold rows.
    assert "?1" in q["sql_params"] and "'" not in q["sql_params"] and not re.search(r"\d{2}", q["sql_params"])
    assert t2s.run_sql(connection, q["sql_params"], t2s.link_values(q["question"])) == rows
  assert t2s.questions() is questions  # cached: the same tuple


def test_prompt_and_lm_text():
  short, long = "How many projects started in 2020?", "Who worked more than 190 hours on the Meridian project?"
  assert len(t2s.prompt_text(short)) == len(t2s.prompt_text(long)) == 3 + t2s.QUESTION_WIDTH + 6
  assert t2s.prompt_text(short).startswith("Q: " + short) and t2s.prompt_text(short).endswith("\nSQL: ")
  sql = "SELECT COUNT(*) FROM projects WHERE year = 2020"
  assert t2s.lm_text(short, sql) == t2s.prompt_text(short) + sql


def test_tfds_builder_examples(tmp_path, questions):
  builder = t2s.TextToSql(data_dir=str(tmp_path))
  assert builder.info.features["domain"].names == list(t2s.LEVELS)
  examples = dict(builder._generate_examples("test"))
  assert len(examples) == 3 * t2s.HELD_OUT["test"]
  for key, ex in examples.items():
    q = questions[key]
    assert q["split"] == "test" and ex["text"] == t2s.lm_text(q["question"], q["sql_params"])
    assert ex["domain"] == q["level"] and ex["sql"] == q["sql"]


def test_value_linker_and_parameters(connection):
  question = "Name the employees older than 45 in the Support department."
  assert t2s.link_values(question) == (45, "Support")
  assert t2s.link_values("Which projects from 2019 belong to departments in Oslo?") == (2019, "Oslo")
  assert t2s.link_values("Who worked more than 40 hours on the Iris project?") == (40, "Iris")
  assert t2s.link_values("How many employees are there?") == ()
  sql = t2s.parametrize(
    "Name the employees older than {age} in the {dept} department.",
    "SELECT e.name FROM employees e JOIN departments d ON e.dept_id = d.id WHERE d.name = '{dept}' AND e.age > {age}",
    ("age", "dept"),
  )
  assert sql.endswith("WHERE d.name = ?2 AND e.age > ?1")
  gold = "SELECT e.name FROM employees e JOIN departments d ON e.dept_id = d.id WHERE d.name = 'Support' AND e.age > 45"
  assert t2s.execution_match(connection, sql, gold, (45, "Support"))
  assert not t2s.execution_match(connection, sql.replace("?2", "?1").replace("> ?1", "> ?2"), gold, (45, "Support"))
  assert t2s.run_sql(connection, "SELECT ?3", (1, 2)) is None  # a parameter without a value


# ------------------------------------------------------------------------------------------------ SQL execution


def test_run_sql_and_execution_match(connection):
  gold = "SELECT COUNT(*) FROM employees WHERE age > 40 AND salary > 50000"
  assert t2s.execution_match(connection, gold, gold)
  assert t2s.execution_match(connection, "SELECT COUNT(*) FROM employees WHERE salary > 50000 AND age > 40", gold)
  assert t2s.execution_match(connection, "select count(1) from employees where age>40 and salary>50000", gold)
  assert not t2s.execution_match(connection, "SELECT COUNT(*) FROM employees WHERE age > 62 AND salary > 50000", gold)
  assert not t2s.execution_match(connection, "SELEC COUNT(*) FROM employees", gold)
  assert t2s.run_sql(connection, "SELECT COUNT(*) FROM employes") is None  # unknown table
  assert t2s.run_sql(connection, "SELECT nope FROM employees") is None  # unknown column
  # Rows compare as a multiset, whatever their order; floats are rounded.
  names = "SELECT name FROM employees WHERE age < 30"
  assert t2s.execution_match(connection, names + " ORDER BY name DESC", names)
  assert t2s.run_sql(connection, "SELECT 1 UNION ALL SELECT 1") == ((1,), (1,)) != t2s.run_sql(connection, "SELECT 1")
  mean = "SELECT AVG(salary) FROM employees WHERE age > 30"
  assert t2s.execution_match(connection, "SELECT SUM(salary) * 1.0 / COUNT(*) FROM employees WHERE age > 30", mean)
  with pytest.raises(ValueError, match="gold SQL does not run"):
    t2s.execution_match(connection, gold, "SELECT FROM")


def test_run_sql_is_read_only():
  connection = t2s.build_database()  # its own: a failure here must not empty the shared one
  writes = ("DELETE FROM employees", "  delete from employees", "DROP TABLE employees")
  for sql in writes + ("SELECT 1; DELETE FROM employees", "WITH x AS (SELECT 1) DELETE FROM employees"):
    assert t2s.run_sql(connection, sql) is None, sql
  assert connection.execute("SELECT COUNT(*) FROM employees").fetchall() == [(t2s.NUM_EMPLOYEES,)]
  assert t2s.run_sql(connection, "  select 1") == ((1,),)


def test_run_sql_aborts_runaway_queries(connection, monkeypatch):
  cross = "SELECT COUNT(*) FROM assignments a, assignments b, assignments c, assignments d"  # 700^4 rows
  assert t2s.run_sql(connection, cross) is None
  assert t2s.run_sql(connection, "SELECT 1") == ((1,),)  # the handler is removed afterwards
  pair = "SELECT COUNT(*) FROM assignments a, assignments b"
  assert t2s.run_sql(connection, pair) == ((700 * 700,),)
  monkeypatch.setattr(t2s, "MAX_SQLITE_STEPS", 1000)  # the step limit is what stops a query
  assert t2s.run_sql(connection, pair) is None


def test_tables_mentioned():
  assert t2s.tables_mentioned("How many employees are older than 30?") == 1
  assert t2s.tables_mentioned("Which departments are in Berlin?") == 1
  assert t2s.tables_mentioned("How many employees work in the Sales department?") == 2
  assert t2s.tables_mentioned("Which projects from 2020 belong to departments in Oslo?") == 2
  assert t2s.tables_mentioned("Who worked more than 50 hours on the Apollo project?") == 3
  assert t2s.tables_mentioned("What is the capital of France?") == 0


# ------------------------------------------------------------------------------------------- votes, pairs, TEP


def test_vote(connection):
  assert ellie_sql.vote(connection, ["SELECT 1", "SELEC bad", "SELECT 2", "SELECT 1+0"]) == 0
  assert ellie_sql.vote(connection, ["SELECT 2", "SELECT 1", "bad", "SELECT 1+0"]) == 1  # the largest group wins
  assert ellie_sql.vote(connection, ["SELECT 2", "SELECT 1", "SELECT 1", "SELECT 2"]) == 0  # a tie: the first group
  assert ellie_sql.vote(connection, ["oops", "SELECT COUNT(*) FROM employees"]) == 1  # the only one that runs
  assert ellie_sql.vote(connection, ["oops", "DELETE FROM employees"]) == 0  # none runs
  count = ["SELECT COUNT(*) FROM projects", "SELECT COUNT(1) FROM projects", "SELECT 24", "SELECT 7"]
  assert ellie_sql.vote(connection, ["SELECT 7"] + count) == 1  # three candidates agree on ((24,),)
  params = ["SELECT ?1", "SELECT ?2", "SELECT 5", "SELECT ?3"]  # with (4, 5): 4, 5, 5, fails
  assert ellie_sql.vote(connection, params, (4, 5)) == 1


def test_dpo_pairs_match_ellie_sql():
  expected = {0: {(0, 1), (0, 2), (1, 2)}, 1: {(1, 2), (1, 0), (2, 0)}, 2: {(2, 0), (2, 1)}}
  for label, pairs in expected.items():
    got = ellie_sql.dpo_pairs(label, 3)
    assert set(got) == pairs and len(got) == len(set(got)), (label, got)
  for m in (2, 4, 5):
    for label in range(m):
      got = ellie_sql.dpo_pairs(label, m)
      assert len(got) == len(set(got)) and all(c != r for c, r in got)
      assert {(label, o) for o in range(m) if o != label} <= set(got)  # the label beats every other member
      assert all(r != label for _, r in got)  # and is never rejected


def test_tep():
  assert ellie_sql.tep(0.8, 200, 0.5, 100) == pytest.approx(0.6)  # +60% accuracy for +100% tokens
  assert ellie_sql.tep(0.4, 150, 0.5, 100) == pytest.approx(-0.4)  # -20% for +50%
  assert ellie_sql.tep(0.6, 50, 0.5, 100) == pytest.approx(-0.4)  # +20% for -50%
  assert math.isnan(ellie_sql.tep(0.8, 100, 0.5, 100))
  assert math.isnan(ellie_sql.tep(0.8, 200, 0.0, 100))


# ------------------------------------------------------------------------------------------------- pipelines


def test_prompt_tokens():
  qs = ["How many projects started in 2020?", "Who worked more than 190 hours on the Meridian project?", "x"]
  tokens = ellie_sql.prompt_tokens(qs)
  assert tokens.shape == (3, 1 + len(t2s.prompt_text("x"))) and tokens.dtype == np.int32
  assert np.all(tokens[:, 0] == ByteTokenizer.bos_id) and np.all(tokens[:, 1:] < 256)
  assert [ByteTokenizer().decode(row) for row in tokens] == [t2s.prompt_text(q) for q in qs]
  with pytest.raises(ValueError, match="differ in length"):
    ellie_sql.prompt_tokens(qs, text=lambda q: q)


@pytest.fixture(scope="module")
def held_out(questions):
  picked = [q for q in questions if q["split"] == "test"][:4]
  return [q["question"] for q in picked], [q["sql"] for q in picked]


@pytest.fixture(scope="module")
def pipeline_results(lm16, held_out, connection):
  qs, gold = held_out
  models = {"small": lm16}
  pipelines = {
    "basic": ellie_sql.Pipeline("basic", "small"),
    "retry": ellie_sql.Pipeline("retry", "small", retries=2),
    "vote": ellie_sql.Pipeline("vote", "small", samples=3),
  }
  run = lambda p: ellie_sql.run_pipeline(p, models, qs, gold, connection, seed=1, batch_size=2)
  return {n: run(p) for n, p in pipelines.items()}


def test_run_pipeline_calls_and_tokens(pipeline_results, held_out, connection):
  qs, gold = held_out
  prompt_len = ellie_sql.prompt_tokens(qs).shape[1]
  basic, retry, vote = (pipeline_results[n] for n in ("basic", "retry", "vote"))
  assert np.all(basic.calls == 1) and np.all(vote.calls == 3)
  runs = np.asarray([t2s.run_sql(connection, s, t2s.link_values(q)) is not None for s, q in zip(retry.sql, qs)])
  assert np.all(retry.calls[~runs] == 3) and np.all((retry.calls >= 1) & (retry.calls <= 3))
  for r in pipeline_results.values():
    assert len(r.sql) == len(qs) and r.correct.shape == r.tokens.shape == r.calls.shape == r.confidence.shape
    assert np.all(r.tokens >= r.calls * prompt_len)
    assert np.all(r.tokens <= r.calls * (prompt_len + t2s.SQL_MAX_CHARS + 1))
    assert not r.correct.any()  # a random LM writes no working SQL
    assert np.all((r.confidence > 0) & (r.confidence <= 1))
  # One greedy call: its tokens are the prompt and the decoded SQL bytes + EOS (or the full SQL_MAX_CHARS + 1).
  generated = basic.tokens - prompt_len
  assert np.all((generated >= 1) & (generated <= t2s.SQL_MAX_CHARS + 1))
  # Nothing runs, so the vote keeps the first, greedy candidate: the basic pipeline's answer.
  assert vote.sql == basic.sql and np.allclose(vote.confidence, basic.confidence)


def test_run_pipeline_unknown_member(lm16, held_out, connection):
  qs, gold = held_out
  with pytest.raises(ConfigError, match="'medium'.*allowed: \\['small'\\]"):
    ellie_sql.run_pipeline(ellie_sql.PIPELINES[1], {"small": lm16}, qs, gold, connection)


def test_decode_sql_seeds(lm16, held_out):
  model, variables = lm16
  prompts = ellie_sql.prompt_tokens(held_out[0])
  greedy = [ellie_sql.decode_sql(model, variables, prompts, temperature=0.0, seed=s, batch_size=4) for s in (0, 1)]
  assert greedy[0][0] == greedy[1][0] and np.array_equal(greedy[0][1], greedy[1][1])
  sampled = [ellie_sql.decode_sql(model, variables, prompts, temperature=1.0, seed=s, batch_size=4) for s in (0, 1)]
  assert sampled[0][0] != sampled[1][0]
  again = ellie_sql.decode_sql(model, variables, prompts, temperature=1.0, seed=0, batch_size=4)
  assert again[0] == sampled[0][0]  # a seed fixes the samples
  sql, generated, confidence = greedy[0]
  assert len(sql) == 4 and generated.shape == confidence.shape == (4,)
  assert np.all((generated >= 1) & (generated <= t2s.SQL_MAX_CHARS + 1))


def test_question_features(lm16, held_out):
  model, variables = lm16
  prompts = ellie_sql.prompt_tokens(held_out[0])
  features = ellie_sql.question_features(model, variables, prompts, batch_size=3)  # two batches
  assert features.shape == (4, 16) and np.all(np.isfinite(features))
  alone = ellie_sql.question_features(model, variables, prompts[1:2])
  np.testing.assert_allclose(alone[0], features[1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ routing data


def test_routing_data_tokens_and_flops():
  result = lambda correct, tokens, conf: ellie_sql.PipelineResult(
    sql=("",) * 3,
    correct=np.asarray(correct, bool),
    tokens=np.asarray(tokens),
    calls=np.ones(3, np.int64),
    confidence=np.asarray(conf, np.float64),
  )
  results = {
    "basic": result([1, 0, 0], [100, 110, 120], [0.9, 0.2, 0.3]),
    "intermediate": result([1, 1, 0], [100, 300, 330], [0.8, 0.7, 0.1]),
    "advanced": result([0, 1, 1], [800, 900, 1000], [0.5, 0.6, 0.7]),
  }
  flops = {"small": 2.0, "medium": 5.0}
  router_tokens = np.arange(12).reshape(3, 4)
  data, data_flops = ellie_sql.routing_data(
    results,
    ellie_sql.PIPELINES,
    features=np.ones((3, 2)),
    feature_tokens=[94, 94, 94],
    flops_per_token=flops,
    levels=[0, 2, 1],
    level_names=t2s.LEVELS,
    complexity=[1, 3, 2],
    router_tokens=router_tokens,
  )
  assert data.members == ("basic", "intermediate", "advanced") and data.categories == t2s.LEVELS
  np.testing.assert_array_equal(data.quality, [[1, 1, 0], [0, 1, 1], [0, 0, 1]])
  np.testing.assert_array_equal(cheapest_sufficient(data.quality), [0, 1, 2])
  np.testing.assert_array_equal(data.cost, [[100, 100, 800], [110, 300, 900], [120, 330, 1000]])
  np.testing.assert_array_equal(data_flops.cost, [[200, 500, 4000], [220, 1500, 4500], [240, 1650, 5000]])
  np.testing.assert_array_equal(data.feature_cost, [94, 94, 94])
  np.testing.assert_array_equal(data_flops.feature_cost, [188, 188, 188])  # read by the small member
  np.testing.assert_allclose(data.confidence, [[0.9, 0.8, 0.5], [0.2, 0.7, 0.6], [0.3, 0.1, 0.7]])
  np.testing.assert_array_equal(data.category, [0, 2, 1])
  np.testing.assert_array_equal(data.complexity, [1, 3, 2])
  assert data.tokens is router_tokens and data_flops.tokens is router_tokens
  assert data.features.dtype == np.float32 and data.features.shape == (3, 2)
  np.testing.assert_array_equal(data_flops.quality, data.quality)


# ------------------------------------------------------------------------------------------------ DPO LM router


def planted_data(num=30, seed=0):
  """Byte prompts 'xy' + d whose last byte d in '012' is the label; quality is one-hot at it."""
  rng = np.random.default_rng(seed)
  labels = np.arange(num) % 3
  rng.shuffle(labels)
  texts = ["".join(rng.choice(list("abcdefgh"), 2)) + str(label) for label in labels]
  tokens = np.stack([ByteTokenizer().encode(t, add_eos=False) for t in texts])
  data = RoutingData(
    quality=np.eye(3)[labels],
    cost=np.tile([1.0, 2.0, 4.0], (num, 1)),
    features=np.zeros((num, 1)),
    feature_cost=np.zeros(num),
    confidence=np.zeros((num, 3)),
    category=np.zeros(num, np.int64),
    members=("a", "b", "c"),
    tokens=tokens,
  )
  return data, labels


@pytest.fixture(scope="module")
def lm32():
  return tiny_lm(32)


@pytest.fixture(scope="module")
def dpo_router(lm32):
  model, variables = lm32
  data, labels = planted_data()
  router = make_router("dpo_lm", model=model, variables=variables, sft_steps=100, dpo_steps=50)
  return router.fit(data, seed=0), data, labels


def test_dpo_lm_router_learns_planted_labels(dpo_router):
  router, data, labels = dpo_router
  assert isinstance(router, ellie_sql.DpoLmRouter) and router.family == "generative"
  assert np.array_equal(cheapest_sufficient(data.quality), labels)
  decision = router.route(data, router.knobs()[0])
  assert decision.choice.shape == (len(data),) and decision.uses_features
  assert np.all(decision.ran.sum(axis=1) == 1) and np.array_equal(np.argmax(decision.ran, axis=1), decision.choice)
  assert np.mean(decision.choice == labels) >= 0.9
  log_probs = router.label_log_probs(data)
  assert log_probs.shape == (len(data), 3) and np.all(log_probs <= 0)
  assert router.sft_loss_ < math.log(3)  # below the uniform guess over the labels
  assert router.dpo_loss_ < math.log(2)  # the policy moved the chosen-vs-rejected log-ratio the right way


def test_dpo_lm_router_errors(lm32, dpo_router):
  model, variables = lm32
  data, _ = planted_data(6)
  no_tokens = dataclasses.replace(data, tokens=None)
  with pytest.raises(ConfigError, match="RoutingData.tokens"):
    make_router("dpo_lm", model=model, variables=variables).fit(no_tokens)
  with pytest.raises(ConfigError, match="model="):
    make_router("dpo_lm").fit(data)
  with pytest.raises(ConfigError, match="RoutingData.tokens"):
    dpo_router[0].route(no_tokens, 0.5)


def test_dpo_lm_router_without_dpo_stage_is_the_reference(lm32, dpo_router):
  """`dpo_steps=0` (SFT only) fits: the same seed gives the SFT model that the DPO stage started from, and DPO raises
  log pi(chosen) - log pi(rejected) against it on the training pairs (Rafailov et al. eq. 7)."""
  model, variables = lm32
  router, data, labels = dpo_router
  sft = make_router("dpo_lm", model=model, variables=variables, sft_steps=100, dpo_steps=0).fit(data, seed=0)
  policy, reference = router.label_log_probs(data), sft.label_log_probs(data)
  margins = [
    (policy[q, c] - reference[q, c]) - (policy[q, r] - reference[q, r])
    for q in range(len(data))
    for c, r in ellie_sql.dpo_pairs(int(labels[q]), 3)
  ]
  assert np.mean(margins) > 0


# ----------------------------------------------------------------------------------------------------- the tool


def sql_run(root, name, dataset="text_to_sql"):
  config = member_config(name)
  config.data.name = dataset
  return write_run(root / f"{name}_{dataset}", config)


@pytest.fixture(scope="module")
def sql_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("sql_runs")
  return sql_run(root, "tiny_a"), sql_run(root, "tiny_b")


def test_tool_end_to_end(sql_runs, tmp_path, capsys):
  small, medium = sql_runs
  out = str(tmp_path / "ellie")
  argv = ["--small", small, "--medium", medium, "--out", out, "--limit", "8", "--batch_size", "8"]
  argv += ["--routers", "rule,label_knn,classifier"]
  tool.main(argv)
  printed = capsys.readouterr().out
  assert "| pipeline | member | LM calls / q | EX |" in printed and "| router | family | EX |" in printed
  assert "results.json" in printed
  with open(os.path.join(out, tool.RESULTS)) as f:
    text = f.read()
  results = json.loads(text)
  assert list(results["pipelines"]) == ["basic", "intermediate", "advanced"]
  assert list(results["routers"]) == ["oracle", "rule", "label_knn", "classifier"]
  assert results["questions"] == {"router_train": 5, "router_check": 3, "test": 8}
  pipelines = results["pipelines"]
  assert [p["member"] for p in pipelines.values()] == ["small", "medium", "medium"]
  assert pipelines["basic"]["calls"] == 1 and pipelines["advanced"]["calls"] == 8
  assert 1 <= pipelines["intermediate"]["calls"] <= 3
  assert pipelines["basic"]["flops"] < pipelines["advanced"]["flops"] and pipelines["advanced"]["flops_rel"] == 1
  oracle = results["routers"]["oracle"]
  assert all(oracle["ex"] >= p["ex"] for p in pipelines.values())
  assert sum(results["labels_test"]) == pytest.approx(1)
  for r in results["routers"].values():
    assert sum(r["share"]) == pytest.approx(1) and 0 <= r["ex"] <= 1
  assert os.path.getsize(os.path.join(out, tool.PLOT)) > 0
  with pytest.raises(SystemExit) as stop:
    tool.main(argv)  # the results are not overwritten without --overwrite
  assert stop.value.code == 2 and "already holds results.json" in capsys.readouterr().err
  with open(os.path.join(out, tool.RESULTS)) as f:
    assert f.read() == text


def test_tool_bad_input(sql_runs, tmp_path, capsys):
  small, medium = sql_runs
  other = sql_run(tmp_path, "tiny_a", dataset="pystdlib")
  base = ["--out", str(tmp_path / "out"), "--limit", "2", "--routers", "rule"]
  for argv, message in (
    (["--small", other, "--medium", medium], "'pystdlib'; allowed: text_to_sql"),
    (["--small", small, "--medium", str(tmp_path / "missing")], "no such run directory"),
    (["--small", small, "--medium", medium, "--routers", "rule,psychic"], "psychic"),
    (["--small", small, "--medium", medium, "--limit", "-1"], "--limit=-1"),
  ):
    with pytest.raises(SystemExit) as stop:
      tool.main(base + argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err, err
  assert not os.path.exists(tmp_path / "out" / tool.RESULTS)


def test_report_formats_nan_as_dash():
  row = dict(ex=0.5, tokens=100.0, flops=2e9, flops_rel=0.25, tep_tokens=float("nan"), tep_flops=float("nan"))
  row.update(share=[1.0, 0.0, 0.0], random_ex_same_flops=0.4, by_level={"one_table": {"ex": 0.5, "share": [1, 0, 0]}})
  out = {
    "questions": {"router_train": 4, "router_check": 2, "test": 6},
    "labels_test": [0.5, 0.25, 0.25],
    "pipelines": {"basic": {**row, "member": "small", "seconds": 0.01, "calls": 1.0}},
    "routers": {"rule": {**row, "family": "baseline", "label_accuracy": 0.75}},
  }
  text = tool.report(out)
  assert "| basic | small | 1.00 | 0.500 | 100 | 2.000 | 0.250 | 0.0100 | - | - |" in text
  assert "| rule | baseline | 0.500 | 0.400 | 100 | 0.250 | - | - | 0.750 | 1.00/0.00/0.00 |" in text
  assert "| rule | one_table 0.50, 1.00/0.00/0.00 |" in text
