"""The model registry: lazy, per-module imports (a broken model breaks only itself) and the `exposes` contract."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import zoo.models
from zoo.models import ConfigError, build_model, get_model_class, model_names, registry


@pytest.fixture
def extra_models(tmp_path, monkeypatch):
  """Three model modules in a directory added to the package path: one whose import fails on a missing dependency,
  one that registers under another name than its module's, and one that works."""
  (tmp_path / "needs_missing_dep.py").write_text("import zoo_test_missing_dependency  # not installed\n")
  (tmp_path / "misnamed_model.py").write_text(
    "import flax.linen as nn\n"
    "from zoo.models.registry import register_model\n\n\n"
    "@register_model('another_name')\n"
    "class Misnamed(nn.Module):\n"
    "  pass\n"
  )
  (tmp_path / "extra_model.py").write_text(
    "import flax.linen as nn\n"
    "from zoo.models.registry import register_model\n\n\n"
    "@register_model('extra_model')\n"
    "class Extra(nn.Module):\n"
    "  width: int = 3\n"
  )
  monkeypatch.setattr(zoo.models, "__path__", [*zoo.models.__path__, str(tmp_path)])
  yield
  for name in ("needs_missing_dep", "misnamed_model", "extra_model"):
    sys.modules.pop(f"zoo.models.{name}", None)
    registry.MODELS.classes.pop(name, None)


def test_model_names_lists_modules_without_importing_them(extra_models):
  names = model_names()
  assert {"dense_lm", "moe_lm", "mor", "simplenet", "needs_missing_dep", "misnamed_model", "extra_model"} <= set(names)
  assert not {"decoder_parts", "output", "registry"} & set(names)
  assert names == sorted(names)
  assert "zoo.models.needs_missing_dep" not in sys.modules and "zoo.models.extra_model" not in sys.modules


def test_a_missing_dependency_breaks_only_its_own_model(extra_models):
  error = r"model 'needs_missing_dep' cannot be imported, module 'zoo_test_missing_dependency' is missing"
  with pytest.raises(ConfigError, match=error):
    get_model_class("needs_missing_dep")
  with pytest.raises(ConfigError, match="needs_missing_dep"):
    build_model({"name": "needs_missing_dep"})
  # Every other model still works, before and after the failed lookup.
  assert get_model_class("extra_model").registry_name == "extra_model"
  assert build_model({"name": "extra_model", "width": 5}).width == 5
  assert build_model({"name": "dense_lm", "num_layers": 1}).num_layers == 1
  assert "needs_missing_dep" in model_names()


def test_a_model_module_registering_another_name_is_reported(extra_models):
  with pytest.raises(
    ValueError,
    match=r"Misnamed in zoo.models.misnamed_model registers as 'another_name'.*"
    r"must be its module's name \('misnamed_model'\)",
  ):
    get_model_class("misnamed_model")
  assert "another_name" not in registry.MODELS.classes


def test_unknown_names_list_the_models():
  with pytest.raises(
    ConfigError,
    match=r"config.model.name='no_such_model' is not a known model; choose one of "
    r"\[.*'dense_lm'",
  ):
    get_model_class("no_such_model")
  with pytest.raises(ConfigError, match="is not a known model"):
    get_model_class("output")  # a support module, not a model


def test_lookup_imports_only_the_model_asked_for():
  # A fresh interpreter: looking up dense_lm imports neither mor nor simplenet.
  code = (
    "import sys; from zoo.models import get_model_class; get_model_class('dense_lm'); "
    "print(sorted(m for m in sys.modules if m.startswith('zoo.models.')))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    check=True,
    env={"JAX_PLATFORMS": "cpu", "PATH": ""},
    cwd=str(pathlib.Path(__file__).parents[1]),
  )
  loaded = eval(out.stdout.strip().splitlines()[-1])  # pylint: disable=eval-used
  assert "zoo.models.dense_lm" in loaded
  assert not {"zoo.models.mor", "zoo.models.simplenet", "zoo.models.moe_lm"} & set(loaded)


# Small fields per model; the others keep their defaults.
TINY_LM = dict(vocab_size=32, num_layers=2, embed_dim=16, num_heads=2, mlp_dim=16)
TINY = {
  "dense_lm": TINY_LM,
  "moe_lm": dict(TINY_LM, expert_mlp_dim=8),
  "smoe_dropout": dict(TINY_LM, expert_mlp_dim=8),
  "rmoe": dict(TINY_LM, expert_mlp_dim=8, router_hidden_dim=8),
  "smallthinker": dict(TINY_LM, expert_mlp_dim=8),
  "blockffn": dict(TINY_LM, expert_mlp_dim=8, chunk_length=4),
  "readme_moe": dict(TINY_LM, router_mlp_dim=16),
  "duo_llm": TINY_LM,
  "mor": dict(vocab_size=32, embed_dim=16, num_layers=4, num_heads=2, head_dim=8, mlp_dim=16),
  "simplenet": dict(width_multiplier=0.125, num_pools=3),
}


def _expected_shape(model, name, batch, length):
  if name == "expert_ids":
    moe_layers = len(model.moe_layers) if hasattr(model, "moe_layers") else model.num_layers
    k = (
      1
      if model.registry_name == "readme_moe"
      else (model.num_experts if model.registry_name == "blockffn" else model.num_experts_per_tok)
    )
    return (moe_layers, batch, length, k)
  return {"depth": (batch, length), "routes": (batch, length, model.num_layers)}[name]


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_model_sows_exactly_what_it_exposes(name):
  model = build_model({"name": name, **TINY[name]})
  assert isinstance(type(model).exposes, tuple)
  inputs = jnp.zeros((2, 8, 8, 1)) if name == "simplenet" else jnp.zeros((2, 5), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), inputs)
  assert "intermediates" not in variables
  (_, out), state = jax.eval_shape(lambda v: model.apply(v, inputs, mutable=["intermediates"]), variables)
  sown = {k: v for k, v in state.get("intermediates", {}).items() if not k.startswith("layers_")}
  assert set(sown) == set(model.exposes), name
  for key, value in sown.items():
    assert value.dtype == jnp.int32 and value.shape == _expected_shape(model, key, *inputs.shape[:2]), (key, value)
    assert key not in out.metrics


def test_check_config_names_the_key_the_value_and_what_is_allowed():
  import dataclasses

  @dataclasses.dataclass
  class Fields:
    width: object = 4
    window: object = None
    coef: object = 0.5
    rate: object = 0.0
    kind: object = "a"
    dtype: object = "float32"

  rules = dict(
    positive=("width",),
    optional_positive=("window",),
    non_negative=("coef",),
    intervals={"rate": "[0, 1)"},
    choices={"kind": ("a", "b")},
    dtypes=("dtype",),
  )
  registry.check_config(Fields(), **rules)
  registry.check_config(Fields(window=3, rate=0.999, kind="b", dtype="bfloat16"), **rules)
  bad = {
    "width": (0, r"config.model.width=0 must be a positive integer"),
    "window": (2.5, r"config.model.window=2.5 must be a positive integer or None"),
    "coef": (-1e-3, r"config.model.coef=-0.001 must be >= 0"),
    "rate": (1.0, r"config.model.rate=1.0 must be in \[0, 1\)"),
    "kind": ("c", r"config.model.kind='c' is invalid; choose one of \('a', 'b'\)"),
    "dtype": ("float33", r"config.model.dtype='float33' is not a dtype"),
  }
  for key, (value, message) in bad.items():
    with pytest.raises(ConfigError, match=message):
      registry.check_config(Fields(**{key: value}), **rules)
  with pytest.raises(ConfigError, match="must be a positive integer"):
    registry.check_config(Fields(width=True), **rules)  # a bool is no width
  with pytest.raises(ConfigError, match=r"must be in \(0, 1\]"):
    registry.check_config(Fields(rate=0.0), intervals={"rate": "(0, 1]"})
  registry.check_config(Fields(rate=1e9), intervals={"rate": "[0, inf)"})


def test_a_renamed_key_is_read_under_its_new_name_with_a_warning(extra_models, monkeypatch, caplog):
  cls = get_model_class("extra_model")
  monkeypatch.setattr(cls, "renamed_keys", {"breadth": "width"}, raising=False)
  with caplog.at_level("WARNING"):
    assert build_model({"name": "extra_model", "breadth": 7}).width == 7
  assert "config.model.breadth is now called config.model.width" in caplog.text
  with pytest.raises(ConfigError, match="config.model.breadth was renamed to config.model.width .* set only"):
    build_model({"name": "extra_model", "breadth": 7, "width": 8})


def test_list_models_and_create_model():
  from zoo.models import ConfigError, create_model, list_models, model_names

  assert list_models() == model_names() and list_models("moe*") == ["moe_lm"]
  assert {"simplenet", "text_encoder"} <= set(list_models("*e*"))
  model = create_model("simplenet", num_classes=3, width_multiplier=0.5)
  assert type(model).__name__ == "SimpleNet" and model.num_classes == 3
  with pytest.raises(ConfigError, match=r"'nope' is not a known model; choose one of \["):
    create_model("nope")
  with pytest.raises(ConfigError, match="config.model.bogus is not a field of model 'simplenet'"):
    create_model("simplenet", bogus=1)
