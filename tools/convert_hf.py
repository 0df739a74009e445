"""Convert between Hugging Face model directories and zoo orbax checkpoints.

  python tools/convert_hf.py to-zoo HF_DIR OUT_DIR
      HF_DIR (config.json + *.safetensors) -> OUT_DIR/checkpoints/0 (orbax: params and routing state) and
      OUT_DIR/zoo_config.json (the `config.model` to train or evaluate with; `config.init_from=OUT_DIR`).
  python tools/convert_hf.py to-hf ZOO_DIR OUT_DIR --family mixtral|qwen3_moe
      ZOO_DIR (a workdir or a converted dir, with zoo_config.json or --model-config JSON) -> OUT_DIR with config.json
      and model.safetensors, loadable with transformers' AutoModelForCausalLM.from_pretrained.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _to_zoo(args):
  from zoo.checkpoints import convert_hf_to_orbax
  model_config = convert_hf_to_orbax(args.src, args.out)
  print(json.dumps(model_config.to_dict(), sort_keys=True))


def _to_hf(args):
  import flax.linen as nn
  import jax
  import ml_collections
  import orbax.checkpoint as ocp
  from zoo.checkpoints import export_hf
  from zoo.checkpoints.hf import ZOO_CONFIG_FILE, abstract_variables
  from zoo.engine.checkpoint import checkpoint_dir
  config_path = args.model_config or os.path.join(args.src, ZOO_CONFIG_FILE)
  if not os.path.exists(config_path):
    raise SystemExit(f"{config_path} not found: pass --model-config with the model's config as JSON")
  with open(config_path) as f:
    model_config = ml_collections.ConfigDict(json.load(f))
  _, boxed = abstract_variables(model_config)
  abstract = nn.unbox(boxed)
  directory = checkpoint_dir(args.src)
  manager = ocp.CheckpointManager(directory, item_names=("state",))
  step = manager.latest_step()
  if step is None:
    raise SystemExit(f"no checkpoint in {directory}")
  target = {"params": abstract["params"], "collections": {k: v for k, v in abstract.items() if k != "params"}}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
  manager.close()
  state = restored["state"]
  variables = {"params": jax.tree.unflatten(jax.tree.structure(target["params"]), jax.tree.leaves(state["params"])),
               **state.get("collections", {})}
  hf_config = export_hf(model_config, variables, args.out, args.family)
  print(json.dumps(hf_config, sort_keys=True))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  to_zoo = sub.add_parser("to-zoo", help="Hugging Face directory -> orbax checkpoint + zoo_config.json")
  to_zoo.add_argument("src")
  to_zoo.add_argument("out")
  to_hf = sub.add_parser("to-hf", help="zoo checkpoint -> Hugging Face directory")
  to_hf.add_argument("src")
  to_hf.add_argument("out")
  to_hf.add_argument("--family", required=True, choices=("mixtral", "qwen3_moe"))
  to_hf.add_argument("--model-config", help="JSON file with config.model (default: SRC/zoo_config.json)")
  args = parser.parse_args(argv)
  (_to_zoo if args.command == "to-zoo" else _to_hf)(args)


if __name__ == "__main__":
  main()
