"""Text-to-SQL with verifiable answers, for EllieSQL's complexity routing (`papers.md` C4).

EllieSQL routes BIRD/Spider questions between text-to-SQL pipelines of increasing cost and scores them by execution
match. No such benchmark can be downloaded here, so the zoo makes a small one on this machine [generator, named as
such]: a seeded SQLite database of a company (`build_database`: departments, employees, projects and the hours
employees log on projects) and natural-language questions written from templates at three levels of complexity,
each with its gold SQL (`questions`). The level is the number of tables the gold query joins (1, 2 or 3), the
property EllieSQL's rule router looks at. Answers are checked by running the predicted SQL on the database and
comparing its result with the gold query's (`execution_match`), as BIRD's EX metric does.

Why this choice: the answers are verifiable (execution, not string match), the levels give a real difficulty ladder for
small LMs, every part is produced by Python's `sqlite3` and a fixed seed, and the byte-level LMs of the zoo can learn
it on a CPU in minutes. What it is not: a benchmark of open-domain text-to-SQL (one schema, templated questions; the
held-out questions differ from the training ones in their values and combinations, not in their phrasing).

The LM text of an example (`lm_text`) is `Q: <question padded to QUESTION_WIDTH>\\nSQL: <gold SQL>`: padding the
question to a fixed width gives every prompt (`prompt_text`) the same token length, so a batch of prompts decodes
without attention masks.

TFDS builder `text_to_sql` (`TextToSql`): features `text` (the LM text), `question`, `sql`, `domain` (ClassLabel over
`LEVELS`); splits `train` (the LMs learn from it), `validation` and `test` (held-out questions: the routers' training,
threshold and report queries). A question is in exactly one split.
"""

from __future__ import annotations

import functools
import math
import re
import sqlite3

import numpy as np
import tensorflow_datasets as tfds

LEVELS = ("one_table", "two_tables", "three_tables")
QUESTION_WIDTH = 84  # characters; every question is shorter (checked when the questions are made)
SQL_MAX_CHARS = 200  # every gold SQL is shorter (checked); the pipelines decode at most this many bytes
PER_LEVEL = 1500  # questions kept per level (a random subset of the filled templates)
HELD_OUT = {"validation": 200, "test": 200}  # questions per level in each held-out split; the rest train the LMs
SEED = 0

DEPARTMENTS = ("Sales", "Research", "Support", "Finance", "Legal", "Design", "Marketing", "Operations")
CITIES = ("Berlin", "Paris", "Madrid", "Rome", "Vienna", "Oslo", "Lisbon", "Prague")
FIRST_NAMES = (
  "Anna", "Ben", "Clara", "David", "Eva", "Felix", "Greta", "Hugo", "Ida", "Jonas", "Karla", "Leon", "Mia", "Noah",
  "Olga", "Paul", "Rosa", "Sven", "Tina", "Umar", "Vera", "Walter", "Yara", "Zoe",
)  # fmt: skip
PROJECT_TITLES = (
  "Apollo", "Beacon", "Cobalt", "Delta", "Ember", "Falcon", "Granite", "Harbor", "Iris", "Juniper", "Kestrel",
  "Lumen", "Meridian", "Nimbus", "Orchid", "Pioneer", "Quartz", "Raven", "Summit", "Tundra", "Umbra", "Vertex",
  "Willow", "Zephyr",
)  # fmt: skip
YEARS = tuple(range(2015, 2025))
AGES = tuple(range(22, 64))
SALARIES = tuple(range(30000, 90001, 2000))
HOURS = tuple(range(10, 200, 10))
NUM_EMPLOYEES = 240
NUM_ASSIGNMENTS = 700

SCHEMA = """
CREATE TABLE departments (id INTEGER PRIMARY KEY, name TEXT, city TEXT, budget INTEGER);
CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT, age INTEGER, salary INTEGER, dept_id INTEGER);
CREATE TABLE projects (id INTEGER PRIMARY KEY, title TEXT, year INTEGER, cost INTEGER, dept_id INTEGER);
CREATE TABLE assignments (emp_id INTEGER, project_id INTEGER, hours INTEGER);
"""

# The joins the templates use, by the tables they bring in (aliases e, d, p, a).
_ED = "employees e JOIN departments d ON e.dept_id = d.id"
_PD = "projects p JOIN departments d ON p.dept_id = d.id"
_EAP = "employees e JOIN assignments a ON a.emp_id = e.id JOIN projects p ON a.project_id = p.id"

# (level, question template, SQL template, slots); a slot name is filled from `_SLOT_VALUES`.
TEMPLATES = (
  (0, "How many employees are older than {age}?", "SELECT COUNT(*) FROM employees WHERE age > {age}", ("age",)),
  (0, "List the names of employees younger than {age}.", "SELECT name FROM employees WHERE age < {age}", ("age",)),
  (
    0,
    "What is the average salary of employees older than {age}?",
    "SELECT AVG(salary) FROM employees WHERE age > {age}",
    ("age",),
  ),
  (
    0,
    "How many employees earn more than {salary}?",
    "SELECT COUNT(*) FROM employees WHERE salary > {salary}",
    ("salary",),
  ),
  (0, "Which departments are in {city}?", "SELECT name FROM departments WHERE city = '{city}'", ("city",)),
  (
    0,
    "What is the budget of the {dept} department?",
    "SELECT budget FROM departments WHERE name = '{dept}'",
    ("dept",),
  ),
  (0, "How many projects started in {year}?", "SELECT COUNT(*) FROM projects WHERE year = {year}", ("year",)),
  (
    0,
    "How many employees older than {age} earn more than {salary}?",
    "SELECT COUNT(*) FROM employees WHERE age > {age} AND salary > {salary}",
    ("age", "salary"),
  ),
  (
    0,
    "List the employees younger than {age} who earn less than {salary}.",
    "SELECT name FROM employees WHERE age < {age} AND salary < {salary}",
    ("age", "salary"),
  ),
  (
    0,
    "Which projects from {year} cost more than {cost}?",
    "SELECT title FROM projects WHERE year = {year} AND cost > {cost}",
    ("year", "cost"),
  ),
  (0, "What did the {title} project cost?", "SELECT cost FROM projects WHERE title = '{title}'", ("title",)),
  (
    1,
    "How many employees work in the {dept} department?",
    f"SELECT COUNT(*) FROM {_ED} WHERE d.name = '{{dept}}'",
    ("dept",),
  ),
  (
    1,
    "What is the average salary in the {dept} department?",
    f"SELECT AVG(e.salary) FROM {_ED} WHERE d.name = '{{dept}}'",
    ("dept",),
  ),
  (
    1,
    "Name the employees older than {age} in the {dept} department.",
    f"SELECT e.name FROM {_ED} WHERE d.name = '{{dept}}' AND e.age > {{age}}",
    ("age", "dept"),
  ),
  (
    1,
    "How many employees of departments in {city} earn more than {salary}?",
    f"SELECT COUNT(*) FROM {_ED} WHERE d.city = '{{city}}' AND e.salary > {{salary}}",
    ("city", "salary"),
  ),
  (
    1,
    "How many employees of the {dept} department earn less than {salary}?",
    f"SELECT COUNT(*) FROM {_ED} WHERE d.name = '{{dept}}' AND e.salary < {{salary}}",
    ("dept", "salary"),
  ),
  (
    1,
    "What is the average salary of employees older than {age} in {city}?",
    f"SELECT AVG(e.salary) FROM {_ED} WHERE d.city = '{{city}}' AND e.age > {{age}}",
    ("age", "city"),
  ),
  (
    1,
    "What is the total cost of the {dept} department's projects from {year}?",
    f"SELECT SUM(p.cost) FROM {_PD} WHERE d.name = '{{dept}}' AND p.year = {{year}}",
    ("dept", "year"),
  ),
  (
    1,
    "Which projects from {year} belong to departments in {city}?",
    f"SELECT p.title FROM {_PD} WHERE d.city = '{{city}}' AND p.year = {{year}}",
    ("year", "city"),
  ),
  (
    2,
    "Who worked more than {hours} hours on the {title} project?",
    f"SELECT e.name FROM {_EAP} WHERE p.title = '{{title}}' AND a.hours > {{hours}}",
    ("hours", "title"),
  ),
  (
    2,
    "How many hours did employees older than {age} log on projects from {year}?",
    f"SELECT SUM(a.hours) FROM {_EAP} WHERE e.age > {{age}} AND p.year = {{year}}",
    ("age", "year"),
  ),
  (
    2,
    "How many employees earning more than {salary} worked on the {title} project?",
    f"SELECT COUNT(DISTINCT e.id) FROM {_EAP} WHERE p.title = '{{title}}' AND e.salary > {{salary}}",
    ("salary", "title"),
  ),
  (
    2,
    "What is the average age of the people on projects from {year} costing over {cost}?",
    f"SELECT AVG(e.age) FROM {_EAP} WHERE p.year = {{year}} AND p.cost > {{cost}}",
    ("year", "cost"),
  ),
)
_SLOT_VALUES = {
  "age": AGES,
  "salary": SALARIES,
  "city": CITIES,
  "dept": DEPARTMENTS,
  "year": YEARS,
  "title": PROJECT_TITLES,
  "hours": HOURS,
  "cost": tuple(range(100000, 1000001, 50000)),
}


@functools.cache
def database_rows(seed: int = SEED) -> dict[str, tuple[tuple, ...]]:
  """The generated rows of every table, by table name (a fixed seed: the same database on every machine)."""
  rng = np.random.default_rng(seed)
  departments = tuple(
    (i + 1, name, CITIES[int(rng.integers(len(CITIES)))], int(rng.integers(5, 50)) * 100000)
    for i, name in enumerate(DEPARTMENTS)
  )
  employees = tuple(
    (
      i + 1,
      f"{FIRST_NAMES[int(rng.integers(len(FIRST_NAMES)))]} {chr(65 + int(rng.integers(26)))}.",
      int(rng.integers(22, 64)),
      int(rng.integers(30, 90)) * 1000,
      int(rng.integers(len(DEPARTMENTS))) + 1,
    )
    for i in range(NUM_EMPLOYEES)
  )
  projects = tuple(
    (i + 1, title, int(rng.choice(YEARS)), int(rng.integers(2, 20)) * 50000, int(rng.integers(len(DEPARTMENTS))) + 1)
    for i, title in enumerate(PROJECT_TITLES)
  )
  pairs = {(int(rng.integers(NUM_EMPLOYEES)) + 1, int(rng.integers(len(PROJECT_TITLES))) + 1) for _ in range(900)}
  assignments = tuple((e, p, int(rng.integers(1, 25)) * 10) for e, p in sorted(pairs)[:NUM_ASSIGNMENTS])
  return {"departments": departments, "employees": employees, "projects": projects, "assignments": assignments}


def build_database(path: str = ":memory:", seed: int = SEED) -> sqlite3.Connection:
  """The company database (SCHEMA + `database_rows(seed)`) in SQLite at `path` (default in memory)."""
  connection = sqlite3.connect(path)
  connection.executescript(SCHEMA)
  for table, rows in database_rows(seed).items():
    connection.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(rows[0]))})", rows)
  connection.commit()
  return connection


MAX_SQLITE_STEPS = 2_000_000  # a predicted query running longer (e.g. an unintended cross join) counts as wrong


def run_sql(connection: sqlite3.Connection, sql: str, params=()):
  """The rows of `sql` (with `params` bound to its ?1, ?2, ... parameters) on `connection` as a sorted tuple (floats
  rounded to 6 digits), or None when the query fails (syntax error, unknown column, a parameter without a value, more
  than MAX_SQLITE_STEPS virtual-machine steps, not a read-only SELECT)."""
  if not sql.lstrip().upper().startswith("SELECT"):
    return None
  steps = [0]

  def _abort():
    steps[0] += 1
    return steps[0] * 1000 > MAX_SQLITE_STEPS

  connection.set_progress_handler(_abort, 1000)
  try:
    rows = connection.execute(sql, tuple(params)).fetchall()
  except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError):
    return None
  finally:
    connection.set_progress_handler(None, 1000)

  def _value(v):
    return round(v, 6) if isinstance(v, float) and math.isfinite(v) else v

  return tuple(sorted((tuple(_value(v) for v in row) for row in rows), key=repr))


def execution_match(connection: sqlite3.Connection, predicted: str, gold: str, params=()) -> bool:
  """BIRD's execution accuracy for one question: the predicted query (with the linked `params`) runs and returns the
  gold query's rows (as a multiset; the templates' queries have no ORDER BY)."""
  expected = run_sql(connection, gold)
  if expected is None:
    raise ValueError(f"execution_match: the gold SQL does not run: {gold!r}")
  return run_sql(connection, predicted, params) == expected


_NAMED_VALUES = DEPARTMENTS + CITIES + PROJECT_TITLES


def link_values(question: str) -> tuple:
  """The value linker: the database values a question names, in the order they appear, as SQL parameters ?1, ?2, ...
  (integers, and the department, city and project names the database holds). BIRD pipelines retrieve such values from
  the database before generation; here they are bound as parameters, so the LMs write SQL without copying literals
  (see the module docstring)."""
  found = [(m.start(), int(m.group())) for m in re.finditer(r"\b\d+\b", question)]
  found += [(m.start(), name) for name in _NAMED_VALUES for m in re.finditer(rf"\b{name}\b", question)]
  return tuple(v for _, v in sorted(found, key=lambda pair: pair[0]))


def parametrize(question_template: str, sql_template: str, slots) -> str:
  """The SQL template with each slot as the parameter ?k, k its order of appearance in the question template."""
  order = sorted(slots, key=lambda slot: question_template.index("{" + slot + "}"))
  sql = sql_template
  for k, slot in enumerate(order, 1):
    sql = sql.replace("'{" + slot + "}'", f"?{k}").replace("{" + slot + "}", f"?{k}")
  return sql


def tables_mentioned(question: str) -> int:
  """EllieSQL's rule-router feature made from the question alone: how many tables a keyword schema linker finds
  (employees: employee/people/who/name; departments: department; projects: project; assignments: hours/worked on)
  [guess: EllieSQL counts the tables of its schema linker's output; the zoo has no LM schema linker]."""
  q = question.lower()
  keys = (
    ("employee", "people", "who ", "name the", "names of"),
    ("department",),
    ("project",),
    ("hours", "worked on"),
  )
  return sum(any(k in q for k in words) for words in keys)


@functools.cache
def questions(seed: int = SEED) -> tuple[dict, ...]:
  """Every templated question with its gold SQL, level and split, in a fixed shuffled order.

  Each template is filled with every combination of its slot values; a question whose gold answer is empty (no rows,
  or a single NULL) is left out, so that an empty result never counts as correct. At most `PER_LEVEL` questions of
  each level are kept (a seeded random subset), `HELD_OUT[split]` of each level go to `validation` and `test`, the
  rest to `train`.

  Returns:
    ({'question', 'sql' (the gold SQL with its literals), 'sql_params' (the same with the linked values as parameters,
    what the LMs learn to write), 'level' (0-2), 'split'}, ...).
  """
  import itertools

  connection = build_database(seed=seed)
  made = []
  for level, question, sql, slots in TEMPLATES:
    for values in itertools.product(*(_SLOT_VALUES[s] for s in slots)):
      fill = dict(zip(slots, values))
      q, s = question.format(**fill), sql.format(**fill)
      rows, with_params = run_sql(connection, s), parametrize(question, sql, slots)
      if rows is None:
        raise ValueError(f"template SQL does not run: {s!r}")
      if run_sql(connection, with_params, link_values(q)) != rows:
        raise ValueError(f"the value linker misses the values of {q!r} for {with_params!r}")
      if not rows or rows == ((None,),):
        continue
      if len(q) > QUESTION_WIDTH or len(s) > SQL_MAX_CHARS:
        raise ValueError(f"question or SQL longer than its width: {q!r} / {s!r}")
      made.append({"question": q, "sql": s, "sql_params": with_params, "level": level})
  rng = np.random.default_rng(seed)
  kept = []
  for level in range(len(LEVELS)):
    of_level = [ex for ex in made if ex["level"] == level]
    order = rng.permutation(len(of_level))[:PER_LEVEL]
    splits = [s for s, n in HELD_OUT.items() for _ in range(n)]
    if len(order) < len(splits) * 2:
      raise ValueError(f"level {LEVELS[level]!r} has {len(order)} questions; the held-out splits need {len(splits)}")
    kept += [{**of_level[i], "split": splits[j] if j < len(splits) else "train"} for j, i in enumerate(order)]
  made = [kept[i] for i in rng.permutation(len(kept))]
  return tuple(made)


def prompt_text(question: str) -> str:
  """The prompt the SQL LMs continue: the question padded to QUESTION_WIDTH, then 'SQL: '."""
  return f"Q: {question:<{QUESTION_WIDTH}}\nSQL: "


def lm_text(question: str, sql: str) -> str:
  """One LM training document: the prompt and the gold SQL (with parameters, `questions()['sql_params']`)."""
  return prompt_text(question) + sql


class TextToSql(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Templated questions over the generated company database with their gold SQL (see the module docstring)."""

  name = "text_to_sql"
  code_path = None  # nothing to download, no checksums file
  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
    "1.0.0": "23 templates, 3 levels, <= 1,500 questions per level; 200 per level held out twice.",
    "2.0.0": "The LM text's SQL takes the question's values as parameters ?1, ?2, ... (`link_values`).",
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=tfds.features.FeaturesDict(
        {
          "text": tfds.features.Text(),
          "question": tfds.features.Text(),
          "sql": tfds.features.Text(),
          "domain": tfds.features.ClassLabel(names=LEVELS),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data is made here.
    return {split: self._generate_examples(split) for split in ("train", "validation", "test")}

  def _generate_examples(self, split: str):
    for i, ex in enumerate(questions()):
      if ex["split"] == split:
        record = {"question": ex["question"], "sql": ex["sql"], "domain": ex["level"]}
        yield i, {"text": lm_text(ex["question"], ex["sql_params"]), **record}
