"""Convert between Hugging Face model directories and zoo orbax checkpoints.

  python tools/convert_hf.py to-zoo HF_DIR OUT_DIR [--overwrite]
      HF_DIR (config.json + *.safetensors) -> OUT_DIR/checkpoints/0 (orbax: params and routing state) and
      OUT_DIR/zoo_config.json (the `config.model` to train or evaluate with; `config.init_from=OUT_DIR`).
  python tools/convert_hf.py to-hf ZOO_DIR OUT_DIR --family mixtral|qwen3_moe [--overwrite]
      ZOO_DIR (a workdir or a converted dir, with zoo_config.json or --model-config JSON) -> OUT_DIR with config.json
      and model.safetensors, loadable with transformers' AutoModelForCausalLM.from_pretrained.

  python tools/convert_hf.py lora-to-peft WORKDIR OUT_DIR [--base hf:HF_DIR] [--overwrite]
      the LoRA adapters of the latest checkpoint of a run with config.lora (WORKDIR/config.json gives the model and
      config.lora; the base is the run's config.init_from='hf:HF_DIR' or --base) -> OUT_DIR with adapter_config.json
      and adapter_model.safetensors, loadable with peft's PeftModel.from_pretrained onto HF_DIR. (A PEFT adapter is
      read by a run or an evaluation with --config.lora.adapter=ADAPTER_DIR.)

OUT_DIR must be new or empty; --overwrite replaces a non-empty OUT_DIR whole (the output is written to a temporary
directory beside it and swapped in at the end, so a failed conversion leaves OUT_DIR as it was). OUT_DIR may not be
the source, lie inside it or contain it; the source is never modified. Bad input (a missing or malformed source, an
unsupported model, ...) prints one line `error: ...` and exits with status 2.
"""

import argparse
import json
import os
import sys


class _UsageError(Exception):
  """Bad input found by this script; printed as one line."""


class _Parser(argparse.ArgumentParser):
  """argparse with its errors as one line `error: ...` (exit status 2) instead of usage + message."""

  def error(self, message):
    print(f"error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def _check_source(path, what):
  if not os.path.exists(path):
    raise _UsageError(f"{what} {path} does not exist")
  if not os.path.isdir(path):
    raise _UsageError(f"{what} {path} is not a directory")


def _to_zoo(args):
  from zoo.checkpoints import check_destination, convert_hf_to_orbax

  _check_source(args.src, "HF_DIR")
  if not os.path.isfile(os.path.join(args.src, "config.json")):
    raise _UsageError(f"HF_DIR {args.src} has no config.json; expected a Hugging Face model directory")
  check_destination(args.out, overwrite=args.overwrite, sources=(args.src,), option="--overwrite")
  model_config = convert_hf_to_orbax(args.src, args.out, overwrite=args.overwrite)
  print(json.dumps(model_config.to_dict(), sort_keys=True))


def _read_model_config(path):
  import ml_collections

  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _UsageError(f"model config {path} is not valid JSON ({e})") from None
  if not isinstance(config, dict) or not isinstance(config.get("name"), str):
    raise _UsageError(f"model config {path} must be a JSON object with the model's 'name' and fields (a config.model)")
  return ml_collections.ConfigDict(config)


def _restore(src, abstract):
  """The variables of the latest checkpoint of the workdir (or checkpoints folder) `src`, read-only."""
  import jax
  import orbax.checkpoint as ocp

  from zoo.engine.checkpoint import checkpoint_dir

  directory = checkpoint_dir(src)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False), item_names=("state",))
  try:
    step = manager.latest_step()
    if step is None:
      raise _UsageError(f"no checkpoint in {directory} (expected {directory}/<step>/state)")
    target = {"params": abstract["params"], "collections": {k: v for k, v in abstract.items() if k != "params"}}
    try:
      restored = manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
          )
        ),
      )
    except Exception as e:  # orbax/tensorstore raise many types; all mean the same here
      first = (str(e).strip().splitlines() or [""])[0][:300]
      raise _UsageError(
        f"checkpoint step {step} in {directory} cannot be restored into the model config "
        f"({type(e).__name__}: {first}); it is corrupted or belongs to another model"
      ) from None
  finally:
    manager.close()
  state = restored["state"]
  variables = {
    "params": jax.tree.unflatten(jax.tree.structure(target["params"]), jax.tree.leaves(state["params"])),
    **state.get("collections", {}),
  }
  wanted = {jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    name = jax.tree_util.keystr(path)
    if name in wanted and tuple(leaf.shape) != tuple(wanted[name]):
      raise _UsageError(
        f"checkpoint step {step} in {directory} does not fit the model config: variable {name} "
        f"has shape {tuple(leaf.shape)}, the config gives {tuple(wanted[name])}"
      )
  return variables


def _to_hf(args):
  import flax.linen as nn

  from zoo.checkpoints import check_destination, export_hf
  from zoo.checkpoints.hf import ZOO_CONFIG_FILE, abstract_variables

  _check_source(args.src, "ZOO_DIR")
  config_path = args.model_config or os.path.join(args.src, ZOO_CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise _UsageError(f"{config_path} not found: pass --model-config with the model's config as JSON")
  sources = (args.src, config_path)
  check_destination(args.out, overwrite=args.overwrite, sources=sources, option="--overwrite")
  model_config = _read_model_config(config_path)
  _, boxed = abstract_variables(model_config)
  variables = _restore(args.src, nn.unbox(boxed))
  hf_config = export_hf(model_config, variables, args.out, args.family, overwrite=args.overwrite, sources=sources)
  print(json.dumps(hf_config, sort_keys=True))


def _lora_to_peft(args):
  import flax.linen as nn
  import jax
  import ml_collections

  from zoo.checkpoints import check_destination, peft_adapters
  from zoo.layers import lora
  from zoo.models.registry import build_model

  _check_source(args.src, "WORKDIR")
  config_path = os.path.join(args.src, "config.json")
  if not os.path.isfile(config_path):
    raise _UsageError(f"WORKDIR {args.src} has no config.json; expected the workdir of a run with config.lora")
  try:
    with open(config_path, encoding="utf-8") as f:
      run = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _UsageError(f"{config_path} is not valid JSON ({e})") from None
  spec = lora.spec_from_config(run.get("lora") or {})
  if spec is None:
    raise _UsageError(f"the run in {args.src} has no LoRA adapters (config.lora.r=0)")
  base = args.base or (run.get("init_from") if isinstance(run.get("init_from"), str) else "")
  if not base.startswith("hf:"):
    raise _UsageError(
      f"the run's config.init_from={run.get('init_from')!r} is not a Hugging Face directory; pass --base hf:HF_DIR, "
      "the model the adapters were trained on"
    )
  sources = (args.src, base[3:])
  check_destination(args.out, overwrite=args.overwrite, sources=sources, option="--overwrite")
  model = lora.with_lora(build_model(ml_collections.ConfigDict(run["model"])), spec)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros((1, 1), "int32"))
  _, adapters = lora.split_adapters(nn.unbox(abstract["params"]))
  variables = _restore(args.src, {"params": adapters})
  arch = peft_adapters.base_arch(base)
  config = peft_adapters.export_adapter(
    variables["params"],
    spec,
    arch,
    args.out,
    base_model_name_or_path=base[3:],
    overwrite=args.overwrite,
    sources=sources,
  )
  print(json.dumps(config, sort_keys=True))


def _expected_errors():
  """The exception types that mean bad input (printed as one line), imported only once a command has run."""
  from zoo.checkpoints import ConversionError
  from zoo.models.registry import ConfigError

  return _UsageError, ConversionError, ConfigError, OSError


def main(argv=None):
  parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  to_zoo = sub.add_parser("to-zoo", help="Hugging Face directory -> orbax checkpoint + zoo_config.json")
  to_zoo.add_argument("src")
  to_zoo.add_argument("out")
  to_hf = sub.add_parser("to-hf", help="zoo checkpoint -> Hugging Face directory")
  to_hf.add_argument("src")
  to_hf.add_argument("out")
  to_hf.add_argument("--family", required=True, choices=("mixtral", "qwen3_moe"))
  to_hf.add_argument("--model-config", help="JSON file with config.model (default: SRC/zoo_config.json)")
  to_peft = sub.add_parser("lora-to-peft", help="the LoRA adapters of a run -> PEFT adapter directory")
  to_peft.add_argument("src")
  to_peft.add_argument("out")
  to_peft.add_argument("--base", default="", help="hf:HF_DIR the adapters were trained on (default: the run's)")
  for command in (to_zoo, to_hf, to_peft):
    command.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR whole")
  args = parser.parse_args(argv)
  try:
    {"to-zoo": _to_zoo, "to-hf": _to_hf, "lora-to-peft": _lora_to_peft}[args.command](args)
  except Exception as e:
    if not isinstance(e, _expected_errors()):
      raise
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
