"""A text sample of a language model, decoded with its KV cache (`config.sample`: prompt, max_new_tokens,
temperature, top_k), with the data's tokenizer."""

import jax
import numpy as np

from zoo.evaluators.base import Evaluator, register_evaluator
from zoo.models import ConfigError


@register_evaluator("sample")
class Sample(Evaluator):
  """Returns {'sample': text} (nothing when config.sample.max_new_tokens is 0)."""

  tasks = ("lm",)

  def __call__(self, ctx):
    from zoo.engine.generate import generate  # pylint: disable=g-import-not-at-top

    s = ctx.config.sample
    if int(s.max_new_tokens) <= 0:
      return {}
    tok = ctx.tokenizer()
    prompt = tok.encode(s.prompt, add_eos=False)[None]
    if prompt.shape[1] == 0:
      raise ConfigError(
        f"config.sample.prompt={s.prompt!r} encodes to no tokens (the tokenizer adds no BOS); "
        "allowed: a non-empty prompt"
      )
    variables = jax.device_get(ctx.state.variables())
    out = generate(
      ctx.exp.model,
      variables,
      prompt,
      max_new_tokens=int(s.max_new_tokens),
      rng=jax.random.key(int(ctx.config.seed)),
      temperature=float(s.temperature),
      top_k=int(s.top_k),
      eos_id=tok.eos_id,
    )
    return {"sample": tok.decode(np.asarray(out)[0])}
