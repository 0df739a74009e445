"""The shared base of every experiment config.

An experiment file calls `get_base_config(model=..., dataset=...)` and sets its own values. Every key a run can use
exists here, so `--config.KEY=VALUE` overrides of unknown keys fail at start-up (ml_collections rejects them) and
`zoo.engine.config.validate_config` rejects unknown keys set inside a config file.
"""
import ml_collections

import zoo.data


def get_base_config(model=None, dataset="pystdlib"):
  """Shared defaults.

  Args:
    model: a dict of model keys (`name` plus the model's dataclass fields), or None.
    dataset: the dataset name; `config.data` starts from its defaults in `zoo.data`.

  Returns:
    A ConfigDict with sections model, data, mesh, optimizer, train, checkpoint.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  # '' = the task the dataset declares (`zoo.data.dataset_info`); 'lm' | 'classification' to insist on one.
  c.task = ""
  c.model = ml_collections.ConfigDict(dict(model or {"name": ""}))
  c.data = zoo.data.default_data_config(dataset) if dataset else ml_collections.ConfigDict({"name": ""})
  # Mesh axis sizes; -1 = all remaining devices (at most one axis).
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})
  c.optimizer = ml_collections.ConfigDict({
      "lr": 1e-3,
      "b1": 0.9,
      "b2": 0.95,
      "eps": 1e-8,
      "weight_decay": 0.1,
      "grad_clip_norm": 1.0,  # 0 = no clipping
      "schedule": "warmup_cosine",  # 'warmup_cosine' | 'warmup_stable_decay' | 'constant'
      "warmup_steps": 100,
      "decay_fraction": 0.2,  # warmup_stable_decay: the final fraction of steps that decays to zero
      "end_lr_fraction": 0.1,  # warmup_cosine: final lr = lr * end_lr_fraction
  })
  c.train = ml_collections.ConfigDict({
      "steps": 1000,
      "batch_size": 32,  # global batch, summed over hosts and devices
      "grad_accum_steps": 1,
      "eval_every_steps": 200,  # 0 = only at the end
      "eval_batches": 10,  # batches of config.data.eval_split; <= 0 = the whole split
      "log_every_steps": 20,
  })
  c.checkpoint = ml_collections.ConfigDict({
      "every_steps": 200,  # 0 = only at the end (and on SIGTERM)
      "keep": 3,
      "async_save": True,  # write in the background while training goes on
  })
  # Start the params and non-param collections from a zoo checkpoint directory (a workdir or its checkpoints/
  # folder) or from a Hugging Face model directory 'hf:DIR' (its config.json then sets config.model).
  c.init_from = ""
  c.sample = ml_collections.ConfigDict({  # evaluate.py's text sample (lm)
      "prompt": "def ",
      "max_new_tokens": 128,
      "temperature": 0.0,  # 0 = greedy
      "top_k": 0,  # 0 = the whole vocabulary
  })
  return c
