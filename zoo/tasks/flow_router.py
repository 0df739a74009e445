"""The router of Decentralized Diffusion Models (McAllister et al. 2025, papers.md D1): from a noised image x_t and
its time t, predict the k-means cluster of the clean image x0 (cross-entropy), the cluster whose expert should
denoise it. The data must be partitioned (`config.data.clusters` = K; `zoo.data.partition`). Same noising as the
experts (`zoo.tasks.flow_matching`).

Model: `model(images=x_t [B, H, W, C], t=t [B], labels=class [B]) -> (logits [B, K], ModelOutput)` (an
unconditional router ignores the labels). Reports loss and accuracy.
"""

import dataclasses

from zoo.models import ConfigError
from zoo.tasks.base import Task, register_task
from zoo.tasks.classification import label_metrics, label_stats
from zoo.tasks.flow_matching import image_spec, noised


@register_task("flow_router")
@dataclasses.dataclass(frozen=True)
class FlowRouter(Task):
  formats = ("images",)
  rng_streams = ("noise", "time")

  def batch_spec(self, info, data_config, batch_size):
    if not info.get("clusters"):
      raise ConfigError(
        "task 'flow_router' predicts the data cluster of x0: set config.data.clusters to the number of experts (>= 2)"
      )
    return image_spec(info, batch_size)

  def prepare(self, batch, rngs):
    _, _, t, x_t = noised(batch, rngs)
    return {"images": x_t, "t": t, "labels": batch["label"]}, {}

  def stats(self, logits, targets, batch):
    return label_stats(logits, batch["cluster"], batch["weight"])

  def finalize(self, sums, info):
    return label_metrics(sums)
