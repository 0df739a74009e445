"""Read-ME expert extraction (papers.md A4; Read-ME Sec. 3.1): a trained dense LM -> a Read-ME checkpoint.

  python tools/readme_extract.py --config configs/readme_moe.py --workdir workdirs/readme_extracted \
      --dense_workdir workdirs/dense_lm [--batches 8] [--keep_fraction 0.5]

For each domain group of `configs/readme_moe.py` (`DOMAIN_GROUPS`, one expert each) it draws `--batches` training
batches of that group's documents, records the input of every FFN `down` projection of the dense LM and takes the
mean |activation| per neuron; each group keeps its top `keep_fraction` neurons, the shared expert is what all groups
keep and expert e is the rest of group e's neurons (`zoo.routing.pregate`). The dense LM's weights are sliced into
those experts and written, with everything else of the dense LM and a freshly initialised pre-gating router, as
step 0 of `--workdir`: the next phases start from it with `--config.init_from` (see `configs/readme_moe.py`).

The dense run's `config.json` (written by train.py) gives its model; its width, depth, heads and vocabulary must be
the Read-ME config's. Prints the neurons per expert and layer, and the validation loss of the dense LM and of the
extracted model (routed by the untrained router) on `config.train.eval_batches` batches.
"""

import os

import numpy as np
from absl import app, flags, logging

from zoo.engine import cli

cli.define_flags()
flags.DEFINE_string("dense_workdir", None, "workdir of the trained dense_lm run (its config.json and checkpoints)")
flags.DEFINE_integer("batches", 8, "training batches per domain group for the neuron statistics")
flags.DEFINE_float("keep_fraction", None, "fraction of neurons each group keeps (default: config.model.keep_fraction)")
flags.mark_flag_as_required("dense_workdir")

# Fields of the dense model that the Read-ME backbone must share.
SHARED_FIELDS = (
  "vocab_size",
  "num_layers",
  "embed_dim",
  "num_heads",
  "num_kv_heads",
  "mlp_dim",
  "mlp_activation",
  "tie_embeddings",
)


def domain_importance(dense, params, data_config, groups, *, batches, batch_size, seed):
  """[layers, groups, mlp] mean |input of down| of `dense` over `batches` batches of each group's documents."""
  from zoo.data import make_iterator
  from zoo.routing.pregate import down_proj_inputs, neuron_importance

  per_group = []
  for name, domains in groups.items():
    cfg = data_config.copy_and_resolve_references()
    cfg.domains = tuple(domains)
    it = make_iterator(cfg, split="train", global_batch_size=batch_size, seed=seed)
    hidden, masks = [], []
    for _ in range(batches):
      batch = next(it)
      hidden.append(down_proj_inputs(dense, params, batch["inputs"]))
      masks.append(batch["mask"])
    importance = neuron_importance(np.concatenate(hidden, axis=1), np.concatenate(masks))
    per_group.append(importance)
    logging.info("group %s: %d batches", name, batches)
  return np.stack(per_group, axis=1)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  from configs.readme_moe import DOMAIN_GROUPS
  from zoo.engine import sharding
  from zoo.engine.checkpoint import Checkpointer, restore_params
  from zoo.engine.trainer import Experiment
  from zoo.engine.writers import MetricsWriter, read_config
  from zoo.routing.pregate import expert_masks, extracted_widths, readme_params_from_dense

  FLAGS = flags.FLAGS
  config = FLAGS.config
  try:
    if config.model.name != "readme_moe":
      raise ValueError(f"config.model.name={config.model.name!r}; readme_extract writes a 'readme_moe' checkpoint")
    if int(config.model.num_experts) != len(DOMAIN_GROUPS):
      raise ValueError(
        f"config.model.num_experts={config.model.num_experts} but there are {len(DOMAIN_GROUPS)} "
        f"domain groups ({sorted(DOMAIN_GROUPS)}), one expert each"
      )
    dense_config = read_config(FLAGS.dense_workdir)
    if dense_config.model.name != "dense_lm":
      raise ValueError(f"{FLAGS.dense_workdir} trained {dense_config.model.name!r}; extraction needs a dense_lm run")
    dense_exp, exp = Experiment(dense_config), Experiment(config)
    dense = dense_exp.model
    for field in SHARED_FIELDS:
      if getattr(dense, field) != getattr(exp.model, field):
        raise ValueError(
          f"the dense LM has {field}={getattr(dense, field)!r}, the Read-ME config "
          f"{getattr(exp.model, field)!r}; they must match"
        )
    dense_target, dense_shardings = dense_exp.abstract_state()
    dense_params = restore_params(FLAGS.dense_workdir, dense_target.variables()["params"])
  except cli.USER_ERRORS as e:
    cli.fail(e)

  keep = FLAGS.keep_fraction if FLAGS.keep_fraction is not None else exp.model.keep_fraction
  importance = domain_importance(
    dense,
    dense_params,
    config.data,
    DOMAIN_GROUPS,
    batches=FLAGS.batches,
    batch_size=int(config.train.batch_size),
    seed=int(config.seed),
  )
  shared, experts = expert_masks(importance, keep_fraction=keep)
  shared_width, expert_width = extracted_widths(shared, experts)
  if shared_width > exp.model.shared_width or expert_width > exp.model.expert_width:
    cli.fail(
      f"extracted widths shared={shared_width}, expert={expert_width} exceed the model's "
      f"shared_width={exp.model.shared_width}, expert_width={exp.model.expert_width}"
    )
  print(f"neurons kept per group: {int(round(keep * exp.model.mlp_dim))} of {exp.model.mlp_dim}")
  print("| layer | shared | " + " | ".join(DOMAIN_GROUPS) + " |")
  print("|---:|---:|" + "---:|" * len(DOMAIN_GROUPS))
  for i in range(shared.shape[0]):
    print(f"| {i} | {int(shared[i].sum())} | " + " | ".join(str(int(m.sum())) for m in experts[i]) + " |")

  state, shardings = exp.init_state()
  params = readme_params_from_dense(dense_params, shared, experts, state.variables()["params"])
  state = exp.with_params(state, params, shardings)
  dense_state = dense_exp.with_params(dense_exp.init_state()[0], dense_params, dense_shardings)
  with sharding.mesh_context(exp.mesh):
    dense_loss = dense_exp.run_eval(dense_state, dense_exp.make_eval_step(dense_shardings, dense_exp.dummy))["loss"]
    extracted_loss = exp.run_eval(state, exp.make_eval_step(shardings, exp.dummy))["loss"]
  print(f"validation loss: dense {dense_loss:.4f}, extracted (untrained router) {extracted_loss:.4f}")

  MetricsWriter(FLAGS.workdir).write_config(config)
  ckpt = Checkpointer(os.path.join(FLAGS.workdir, "checkpoints"), use_async=False)
  ckpt.save(0, state, exp.make_iterator(config.data.train_split, repeat=True).get_state())
  ckpt.wait()
  ckpt.close()
  print(f"wrote step 0 to {ckpt.directory}")


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=cli.parse_flags)
