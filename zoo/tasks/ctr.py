"""Click-through-rate (CTR) prediction: one click logit per row, binary cross-entropy, exact log-loss and binned AUC.

Data format 'arrays' (`zoo.data`): `categorical` int32 [B, F] (field f's value index in [0, cardinalities[f]), 0 = out
of vocabulary), `numeric` float32 [B, N] (standardised), `domain` int32 [B] (in [0, D)), `label` int32 [B] (1 =
click), plus the engine's `weight` float32 [B] (0 on padding rows). The dataset info holds `features` ({name: (shape
without the batch, dtype name)}), `domains` (the D domain names), `cardinalities`, `field_names`, `numeric_names`.

Model: `model(categorical=[B, F], numeric=[B, N], domain=[B]) -> (logits [B] float32, ModelOutput)` (e.g. `adaptdhm`).

Weighted sums (`stats`), exact over any number of evaluation batches:
- `loss_sum`, `weight`, `positives`: binary cross-entropy of the logits (`optax.sigmoid_binary_cross_entropy`), rows
  and clicks, each weighted.
- `hist_pos`, `hist_neg` [auc_bins]: weighted counts of clicked / not clicked rows per equal-width bin of the predicted
  probability sigmoid(logit) in [0, 1]. The AUC is the Mann-Whitney estimator on the binned scores (a pair in one bin
  counts 1/2, `auc_from_histograms`): exact for scores that fall in distinct bins or tie exactly, and off by at most
  half the weighted fraction of (positive, negative) pairs that share a bin otherwise. Bins are equal-width in
  probability, so predictions concentrated in a narrow range (a low click rate) use fewer of them.
- With `num_domains` = D > 0, the same per domain: `domain_loss_sum`, `domain_weight`, `domain_positives` [D] and
  `domain_hist_pos`, `domain_hist_neg` [D, auc_bins]; rows whose domain is outside [0, D) count in no domain.

`finalize` -> 'loss' (= 'log_loss', the weighted mean cross-entropy), 'auc', 'click_rate', and with D > 0,
'auc/<domain>', 'log_loss/<domain>' per domain name of `info['domains']`. An AUC with no click or no non-click in
its rows is undefined: NaN.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zoo.models import ConfigError
from zoo.tasks.base import Task, register_task

REQUIRED_FEATURES = ("categorical", "numeric", "domain", "label")


def auc_from_histograms(hist_pos, hist_neg):
  """ROC AUC of binned scores: P(score of a positive > score of a negative) + 1/2 P(same bin), weighted.

  Args:
    hist_pos: [bins] (weighted) counts of positives per score bin, bins in increasing score order.
    hist_neg: [bins] the same for negatives.

  Returns:
    the AUC as a float; NaN when either histogram is empty.
  """
  pos, neg = np.asarray(hist_pos, np.float64), np.asarray(hist_neg, np.float64)
  if pos.shape != neg.shape or pos.ndim != 1:
    raise ValueError(f"hist_pos and hist_neg must be 1-d of one shape, got {pos.shape} and {neg.shape}")
  total_pos, total_neg = pos.sum(), neg.sum()
  if total_pos <= 0 or total_neg <= 0:
    return float("nan")
  neg_below = np.cumsum(neg) - neg
  return float(np.sum(pos * (neg_below + 0.5 * neg)) / (total_pos * total_neg))


def score_bins(logits, bins):
  """Equal-width bin of sigmoid(logits) in [0, 1]: int32 indices in [0, bins)."""
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  return jnp.clip(jnp.floor(p * bins), 0, bins - 1).astype(jnp.int32)


@register_task("ctr")
@dataclasses.dataclass(frozen=True)
class CTR(Task):
  """Binary click prediction; reports log-loss, AUC and click rate (module docstring).

  Attributes:
    auc_bins: equal-width probability bins of the AUC histograms (4096 [guess]: the AUC error stays below 1e-3 for
      scores spread over [0, 1]).
    num_domains: D for per-domain sums and metrics; 0 = none. It must equal len(info['domains']) when set (the sums
      need D statically, and the info reaches `batch_spec` and `finalize` only).
  """

  auc_bins: int = 4096
  num_domains: int = 0

  formats = ("arrays",)
  default_evals = ()

  def __post_init__(self):
    if isinstance(self.auc_bins, bool) or not isinstance(self.auc_bins, int) or self.auc_bins < 2:
      raise ConfigError(f"config.task_options.auc_bins={self.auc_bins!r}; allowed: an integer >= 2")
    if isinstance(self.num_domains, bool) or not isinstance(self.num_domains, int) or self.num_domains < 0:
      raise ConfigError(
        f"config.task_options.num_domains={self.num_domains!r}; allowed: an integer >= 0 (0 = no per-domain metrics)"
      )

  def batch_spec(self, info, data_config, batch_size):
    features = dict(info.get("features", {}))
    dataset = getattr(data_config, "name", None)
    missing = [name for name in REQUIRED_FEATURES if name not in features]
    if missing:
      raise ConfigError(
        f"config.data.name={dataset!r} lacks the features {missing}; task 'ctr' needs {list(REQUIRED_FEATURES)}"
      )
    domains = len(info.get("domains", ()))
    if self.num_domains and self.num_domains != domains:
      raise ConfigError(
        f"config.task_options.num_domains={self.num_domains} but dataset {dataset!r} has {domains} domains "
        f"{tuple(info.get('domains', ()))}; set it to {domains} (or 0 for no per-domain metrics)"
      )
    spec = {
      name: jax.ShapeDtypeStruct((batch_size, *tuple(shape)), jnp.dtype(dtype))
      for name, (shape, dtype) in features.items()
    }
    spec["weight"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    return spec

  def prepare(self, batch, rngs):
    return {"categorical": batch["categorical"], "numeric": batch["numeric"], "domain": batch["domain"]}, {}

  def stats(self, outputs, targets, batch):
    """outputs: click logits [B] (or [B, 1]) -> the weighted sums of the module docstring."""
    logits = outputs.astype(jnp.float32)
    if logits.ndim == 2 and logits.shape[1] == 1:
      logits = logits[:, 0]
    labels = batch["label"].astype(jnp.float32)
    if logits.shape != labels.shape:
      raise ValueError(f"task 'ctr' expects one click logit per row, [{labels.shape[0]}], got {outputs.shape}")
    w = batch["weight"].astype(jnp.float32)
    bins = int(self.auc_bins)
    ce = optax.sigmoid_binary_cross_entropy(logits, labels) * w
    pos, neg = w * labels, w * (1.0 - labels)
    score = score_bins(logits, bins)
    zeros = jnp.zeros((bins,), jnp.float32)
    sums = {
      "loss_sum": jnp.sum(ce),
      "weight": jnp.sum(w),
      "positives": jnp.sum(pos),
      "hist_pos": zeros.at[score].add(pos, mode="drop"),
      "hist_neg": zeros.at[score].add(neg, mode="drop"),
    }
    d = int(self.num_domains)
    if d:
      domain = batch["domain"].astype(jnp.int32)
      valid = (domain >= 0) & (domain < d)
      row = jnp.where(valid, domain, d)  # index d: out of range, dropped
      cell = jnp.where(valid, domain * bins + score, d * bins)
      per_domain = jnp.zeros((d,), jnp.float32)
      per_cell = jnp.zeros((d * bins,), jnp.float32)
      sums.update(
        domain_loss_sum=per_domain.at[row].add(ce, mode="drop"),
        domain_weight=per_domain.at[row].add(w, mode="drop"),
        domain_positives=per_domain.at[row].add(pos, mode="drop"),
        domain_hist_pos=per_cell.at[cell].add(pos, mode="drop").reshape(d, bins),
        domain_hist_neg=per_cell.at[cell].add(neg, mode="drop").reshape(d, bins),
      )
    return sums

  def finalize(self, sums, info):
    n = max(float(sums["weight"]), 1e-9)
    log_loss = float(sums["loss_sum"]) / n
    out = {
      "loss": log_loss,
      "log_loss": log_loss,
      "auc": auc_from_histograms(sums["hist_pos"], sums["hist_neg"]),
      "click_rate": float(sums["positives"]) / n,
    }
    if "domain_loss_sum" in sums:
      names = tuple(info.get("domains", ()))
      loss, weight = np.asarray(sums["domain_loss_sum"], np.float64), np.asarray(sums["domain_weight"], np.float64)
      hist_pos, hist_neg = np.asarray(sums["domain_hist_pos"]), np.asarray(sums["domain_hist_neg"])
      for i in range(len(loss)):
        name = str(names[i]) if i < len(names) else str(i)
        out[f"auc/{name}"] = auc_from_histograms(hist_pos[i], hist_neg[i])
        out[f"log_loss/{name}"] = float(loss[i] / weight[i]) if weight[i] > 0 else float("nan")
    return out
