"""Every test runs on CPU with 8 virtual devices (set before jax is imported), and every process of the suite (the
xdist workers and the train.py/evaluate.py subprocesses) shares one persistent XLA compilation cache: many tests
compile the same small programs, and a cache hit takes a fraction of a compile. (Unbounded, the cache takes no lock:
an entry read while another process writes it is truncated, fails to decompress, and jax compiles instead. A bound
would lock it, but jax then reads every entry's access time at every write, which slows the suite by half.)

XLA's CPU backend compiles without LLVM optimisation (`--xla_backend_optimization_level=0`) and emits fusions with its
LLVM IR emitters instead of the MLIR fusion emitters (`--xla_cpu_use_fusion_emitters=false`), or with the flags in
ZOO_TEST_XLA_FLAGS ('default' for none): the suite's programs are small, so compiling dominates; the first flag halves
the suite's time, the second takes a further fifth off. The numbers stay IEEE float32 but may round differently from
a default build, so a test that compares with figures recorded by a default build (test_regression.py) measures in a
subprocess without these flags."""

import os

UNOPTIMISED = os.environ.get(
  "ZOO_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
).replace("default", "")
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", UNOPTIMISED]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "xla"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_addoption(parser):
  parser.addoption(
    "--all-configs",
    action="store_true",
    default=False,
    help="test_shipped_configs.py: train and evaluate every shipped config, not the three of CI",
  )


def train_config(*args):
  """The config train.py builds from `args`: --config=configs/FILE.py[:ARG] (get_config(ARG)), then the
  --config.KEY=VALUE overrides, parsed by the same ml_collections flag parser as `zoo.engine.cli.define_flags`; for
  fixtures that train in the test's process rather than in a train.py subprocess."""
  import importlib  # pylint: disable=g-import-not-at-top

  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  path, _, arg = args[0].removeprefix("--config=").partition(":")
  module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
  config = module.get_config(arg) if arg else module.get_config()
  argv, values = ["train.py", *args[1:]], flags.FlagValues()
  options = dict(flag_values=values, sys_argv=argv, lock_config=False, accept_new_attributes=True)
  config_flags.DEFINE_config_dict("config", config, **options)
  values(argv)
  return values.config
