"""AdaptDHM: Li, Zheng, Liu, Lu, Wu and Hu (Cainiao Network), "AdaptDHM: Adaptive Distribution Hierarchical Model for
Multi-Domain CTR Prediction", arXiv:2211.12105 (22 Nov 2022), plus its two baselines as configs of the same module.

The abstract (`shared/seeds/daily-papers-routing.txt`) gives the structure: a clustering process (a "distribution
adaptation module with a customized dynamic routing mechanism" giving each sample a distribution coefficient that
decides its cluster) followed by a classification process in which each cluster has its own network sharing
commonalities with the others. The equations below are those of `shared/papers.md` section G (taken there from a
third-party implementation); the paper's own method section was not read here, so no section numbers are cited.

Input (`assignment` any). F categorical fields, one `nn.Embed` of `embed_dim` per field (value 0 = out of vocabulary;
a value outside [0, cardinalities[f]) is read as 0), concatenated with the N numeric features:
    x = [e_1(c_1), ..., e_F(c_F), numeric]                                   x: [B, d], d = F * embed_dim + N

Distribution adaptation (`assignment='clusters'`; float32, no gradient). K unit-norm centres C [K, d] live in the
non-trainable collection 'clusters' ('centres'), initialised to normalised standard-normal vectors. With
x_n = stop_gradient(x / |x|):
    r = softmax(x_n C^T / temperature)                      (over the K clusters)                r: [B, K]
    C <- normalize(beta C + (1 - beta) S),  S_k = sum_i r_ik x_n_i / B     (`centre_update='mean'`)
                                            S_k = sum_i r_ik x_n_i         (`centre_update='sum'`)
repeated `iterations` times, r recomputed from the current C each time; then the hard assignment
    k_i = argmax_k (x_n C^T)_ik                             (with the updated C)                  k: [B]
Training (`deterministic=False`) runs the update and stores the new C when 'clusters' is mutable (the engine makes
every non-param collection mutable in training); evaluation (`deterministic=True`) assigns with the stored C and
never changes it. The centres are not parameters: no gradient reaches them and the optimizer never sees them; the
assignment is an argmax, so no gradient flows through the routing either (the towers still train the embeddings).

Classification (towers). An MLP with hidden sizes `tower_dims` (ReLU, dropout after each hidden layer) and one output
logit. Group g (a cluster, or a domain) uses, per layer l (the output layer included),
    W_l^g = W_l^shared * W_l^(g)   (elementwise),   b_l^g = b_l^shared + b_l^(g)
and row i is scored by the tower of its group. `assignment='shared'` is the shared-tower baseline (one tower, no
W^(g), b^(g), no centres); `assignment='domain'` the per-domain baseline (group = the given domain index, one
W^(d), b^(d) per domain; a row whose domain lies outside [0, num_domains) gets logit 0 and counts in no load).

Compute: all G towers run on every row and each row keeps its group's logit ([G, B, h] activations, G x the FLOPs of
one tower). For the small G of this model (K = 4, a handful of domains) this is the cheaper choice: the alternative
of gathering each row's effective weights moves B x d x h numbers per layer, and sorting rows by group for a grouped
matmul (`kernels.gmm`) pays a sort, a permutation and ragged shapes, which for small G outweigh G - 1 extra small
dense matmuls (reasoned, not benchmarked; for many domains a grouped matmul would win).

Shapes: `categorical` int [B, F], `numeric` float [B, N], `domain` int [B] -> logits float32 [B].
Parameters: embeddings sum(cardinalities) * embed_dim; with dims = (d, *tower_dims, 1), one tower
T = sum_l (dims[l] * dims[l + 1] + dims[l + 1]); total = embeddings + (1 + G') * T with G' = 0 ('shared'),
num_clusters ('clusters') or num_domains ('domain') (`num_params()`).

Guesses [guess] (not in the abstract or papers.md):
- x_n normalised before the similarity and the centre sum (so beta weighs unit vectors). `temperature` is not in
  papers.md (1 reproduces its formula and is the default), but with cosine similarities in [-1, 1] a temperature of 1
  makes r nearly uniform, every centre is pulled towards the mean direction of the data, and the centres collapse:
  on the generated 'ctr_domains' data (600 steps, batch 512, K = 4) the mean cosine between centres reached 0.9999999
  with temperature 1 (the rows still split, by the centres' tiny residual differences), against 0.14 with 0.1 and
  0.09 with 0.03 (loads 0.23-0.30 each); watch the `centre_similarity` metric. The third-party code does not
  normalise x, which amounts to a temperature of 1 / |x|.
- `centre_update='mean'` by default: the soft sum is divided by the batch rows B, so beta is a per-step momentum
  independent of the batch size and a cluster moves in proportion to its share of the batch; 'sum' (no division)
  lets the batch term dominate beta C for any B >> 1 / (1 - beta), which makes every step a re-estimate from the
  batch alone (the behaviour of the third-party code papers.md cites).
- beta = 0.9, K = 4, embed_dim = 16, tower_dims = (256, 128), ReLU; W^(g) initialised to ones and b^(g) to zeros (so
  every group starts as the shared tower; the third-party code initialises W^(g) like W^shared and uses no biases);
  W^shared Xavier-uniform with the ReLU gain; embeddings normal with stddev 1 / sqrt(embed_dim) (each field's vector
  about unit norm, as a standardised numeric feature).
- The centres are renormalised when read (so an average of replicas' centres under DiLoCo/FedAvg still routes by
  cosine).
- The routing counts every row of a batch, zero-weight padding rows of an evaluation batch included (the model does
  not see the weights); they never update the centres (evaluation does not update).

Sharding: embedding tables are named ('vocab', None); the tower parameters and the centres are replicated.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.models.output import ModelOutput, sow_output
from zoo.models.registry import ConfigError, check_config, register_model

ASSIGNMENTS = ("clusters", "shared", "domain")
CENTRE_UPDATES = ("mean", "sum")
CLUSTERS = "clusters"  # the collection of the centres


def normalize(v, eps=1e-12):
  """v / |v| along the last axis (float32); a zero vector stays zero."""
  v = v.astype(jnp.float32)
  return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), eps * eps))


def soft_assign(x_n, centres, temperature=1.0):
  """r = softmax(x_n C^T / temperature) over the clusters; x_n [B, d], centres [K, d] -> [B, K] float32."""
  scores = jnp.einsum("bd,kd->bk", x_n, centres, preferred_element_type=jnp.float32)
  return jax.nn.softmax(scores / temperature, axis=-1)


def update_centres(x_n, centres, *, beta, iterations, reduction="mean", temperature=1.0):
  """The distribution-adaptation update (module docstring), without gradients.

  Args:
    x_n: [B, d] unit-norm rows.
    centres: [K, d] unit-norm centres.
    beta: the weight of the old centre, in [0, 1).
    iterations: how many updates.
    reduction: 'mean' divides the soft sum by B, 'sum' does not.
    temperature: of the softmax giving r.

  Returns:
    the updated centres [K, d] float32, unit-norm.
  """
  x_n = jax.lax.stop_gradient(x_n.astype(jnp.float32))
  centres = jax.lax.stop_gradient(centres.astype(jnp.float32))
  scale = 1.0 / x_n.shape[0] if reduction == "mean" else 1.0
  for _ in range(iterations):
    r = soft_assign(x_n, centres, temperature)
    pulled = jnp.einsum("bk,bd->kd", r, x_n, preferred_element_type=jnp.float32) * scale
    centres = normalize(beta * centres + (1.0 - beta) * pulled)
  return centres


def _entropy(p, axis=-1):
  return 0.0 - jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis) + 0.0


class GroupTowers(nn.Module):
  """G towers sharing W^shared, b^shared, each with its own W^(g) (ones) and b^(g) (zeros); `groups=0` is the plain
  shared tower. `__call__(x [B, d], deterministic) -> logits [G, B] float32` (G = max(groups, 1))."""

  dims: tuple[int, ...]  # (d, *tower_dims, 1)
  groups: int
  dropout_rate: float = 0.0
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  @nn.compact
  def __call__(self, x, deterministic=True):
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    kernel_init = nn.with_logical_partitioning(
      nn.initializers.variance_scaling(2.0, "fan_avg", "uniform"), (None, None)
    )
    h = x.astype(dtype)[None]  # [1, B, d]: broadcast over the groups in the first layer
    layers = len(self.dims) - 1
    for l in range(layers):
      fan_in, fan_out = self.dims[l], self.dims[l + 1]
      kernel = self.param(f"kernel_{l}", kernel_init, (fan_in, fan_out), param_dtype)
      bias = self.param(
        f"bias_{l}", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (fan_out,), param_dtype
      )
      if self.groups:
        scale = self.param(
          f"group_scale_{l}",
          nn.with_logical_partitioning(nn.initializers.ones, (None, None, None)),
          (self.groups, fan_in, fan_out),
          param_dtype,
        )
        shift = self.param(
          f"group_bias_{l}",
          nn.with_logical_partitioning(nn.initializers.zeros, (None, None)),
          (self.groups, fan_out),
          param_dtype,
        )
        kernel = kernel[None] * scale  # [G, in, out]
        bias = bias[None] + shift  # [G, out]
      else:
        kernel, bias = kernel[None], bias[None]
      kernel, bias = kernel.astype(dtype), bias.astype(dtype)
      if h.shape[0] == 1:
        h = jnp.einsum("bi,gio->gbo", h[0], kernel)
      else:
        h = jnp.einsum("gbi,gio->gbo", h, kernel)
      h = h + bias[:, None, :]
      if l < layers - 1:
        h = nn.relu(h)
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return h[..., 0].astype(jnp.float32)  # [G, B]


@register_model("adaptdhm")
class AdaptDHM(nn.Module):
  """AdaptDHM multi-domain CTR model and its baselines (module docstring). Config keys are the fields below.

  Attributes:
    cardinalities: vocabulary size of each categorical field (value 0 = out of vocabulary), F entries.
    numeric_features: N, the numeric inputs.
    num_domains: D, the domains (used by `assignment='domain'`).
    embed_dim: embedding size of each field.
    tower_dims: hidden sizes of the tower MLP (empty: a linear tower).
    num_clusters: K, the cluster centres and towers of `assignment='clusters'`.
    beta: the weight of the old centre in the centre update, in [0, 1).
    iterations: centre updates per training step (>= 1).
    centre_update: 'mean' (the soft sum divided by the batch rows) or 'sum' [guess, module docstring].
    temperature: of the routing softmax r = softmax(x_n C^T / temperature); 1 is the formula of papers.md.
    assignment: 'clusters' (AdaptDHM), 'shared' (one shared tower) or 'domain' (one tower per domain).
    dropout_rate: dropout after each hidden layer of the towers (training only).
    dtype: compute dtype of the towers; the routing runs in float32 and the logits are float32.
    param_dtype: parameter dtype.

  `exposes`: 'cluster_ids' int32 [B], each row's group (cluster or domain; 0 for 'shared'), sown into
  'intermediates'.
  """

  exposes: ClassVar[tuple[str, ...]] = ("cluster_ids",)
  cardinalities: tuple[int, ...] = ()
  numeric_features: int = 0
  num_domains: int = 1
  embed_dim: int = 16
  tower_dims: tuple[int, ...] = (256, 128)
  num_clusters: int = 4
  beta: float = 0.9
  iterations: int = 3
  centre_update: str = "mean"
  temperature: float = 1.0
  assignment: str = "clusters"
  dropout_rate: float = 0.0
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    check_config(
      self,
      positive=("num_domains", "embed_dim", "num_clusters", "iterations"),
      intervals={"beta": "[0, 1)", "dropout_rate": "[0, 1)", "temperature": "(0, inf)"},
      choices={"assignment": ASSIGNMENTS, "centre_update": CENTRE_UPDATES},
      dtypes=("dtype", "param_dtype"),
    )
    if not _int_tuple(self.cardinalities, minimum=1):
      raise ConfigError(
        f"config.model.cardinalities={self.cardinalities!r} must be a tuple of integers >= 1 (one per categorical "
        "field; value 0 of a field is its out-of-vocabulary entry)"
      )
    if not _int_tuple(self.tower_dims, minimum=1):
      raise ConfigError(f"config.model.tower_dims={self.tower_dims!r} must be a tuple of positive integers")
    if (
      isinstance(self.numeric_features, bool) or not isinstance(self.numeric_features, int) or self.numeric_features < 0
    ):
      raise ConfigError(f"config.model.numeric_features={self.numeric_features!r} must be an integer >= 0")
    if self.input_dim < 1:
      raise ConfigError(
        "config.model.cardinalities and config.model.numeric_features are both empty; the model needs at least one "
        "categorical field or numeric feature"
      )
    super().__post_init__()

  @property
  def input_dim(self):
    """d = F * embed_dim + N."""
    return len(self.cardinalities) * self.embed_dim + self.numeric_features

  @property
  def num_groups(self):
    """G': the per-group weight sets (0 for 'shared')."""
    return {"clusters": self.num_clusters, "domain": self.num_domains, "shared": 0}[self.assignment]

  @property
  def tower_shape(self):
    return (self.input_dim, *self.tower_dims, 1)

  def num_params(self):
    """Embeddings + (1 + G') towers (module docstring); the centres are state, not parameters."""
    dims = self.tower_shape
    tower = sum(dims[l] * dims[l + 1] + dims[l + 1] for l in range(len(dims) - 1))
    return sum(self.cardinalities) * self.embed_dim + (1 + self.num_groups) * tower

  def _check_inputs(self, categorical, numeric, domain):
    fields = len(self.cardinalities)
    if categorical.ndim != 2 or not jnp.issubdtype(categorical.dtype, jnp.integer) or categorical.shape[1] != fields:
      raise ValueError(
        f"categorical must be int [batch, {fields}] (one column per entry of cardinalities), "
        f"got {categorical.dtype} {categorical.shape}"
      )
    batch = categorical.shape[0]
    n = self.numeric_features
    if numeric.ndim != 2 or not jnp.issubdtype(numeric.dtype, jnp.floating) or numeric.shape != (batch, n):
      raise ValueError(
        f"numeric must be float [{batch}, {n}] (numeric_features={n}), got {numeric.dtype} {numeric.shape}"
      )
    if domain is None:
      if self.assignment == "domain":
        raise ValueError("assignment='domain' needs domain, int [batch]")
    elif domain.shape != (batch,) or not jnp.issubdtype(domain.dtype, jnp.integer):
      raise ValueError(f"domain must be int [{batch}], got {domain.dtype} {domain.shape}")

  def _features(self, categorical):
    """The F field embeddings, each [B, embed_dim] (out-of-range values read as 0)."""
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev=self.embed_dim**-0.5), ("vocab", None))
    columns = []
    for f, cardinality in enumerate(self.cardinalities):
      values = categorical[:, f].astype(jnp.int32)
      values = jnp.where((values >= 0) & (values < cardinality), values, 0)
      embed = nn.Embed(
        cardinality,
        self.embed_dim,
        embedding_init=init,
        dtype=jnp.dtype(self.dtype),
        param_dtype=jnp.dtype(self.param_dtype),
        name=f"embed_{f}",
      )
      columns.append(embed(values))
    return columns

  def _route(self, x, deterministic):
    """-> (cluster ids [B] int32, metrics) of 'clusters', updating the stored centres in training."""
    d, k = self.input_dim, self.num_clusters
    centres = self.variable(
      CLUSTERS, "centres", lambda: normalize(jax.random.normal(self.make_rng("params"), (k, d), jnp.float32))
    )
    x_n = jax.lax.stop_gradient(normalize(x))
    # Renormalised on use: stored centres are unit-norm, but an average of them (DiLoCo/FedAvg replicas) is not.
    current = jax.lax.stop_gradient(normalize(centres.value))
    if not deterministic:
      current = update_centres(
        x_n,
        current,
        beta=float(self.beta),
        iterations=self.iterations,
        reduction=self.centre_update,
        temperature=float(self.temperature),
      )
      if self.is_mutable_collection(CLUSTERS) and not self.is_initializing():
        centres.value = current
    r = soft_assign(x_n, current, float(self.temperature))
    ids = jnp.argmax(r, axis=-1).astype(jnp.int32)
    cosine = current @ current.T
    off_diagonal = (jnp.sum(cosine) - jnp.trace(cosine)) / max(k * (k - 1), 1)
    metrics = {"cluster_entropy": jnp.mean(_entropy(r)), "centre_similarity": off_diagonal}
    return ids, metrics

  @nn.compact
  def __call__(self, categorical, numeric, domain=None, *, deterministic=True):
    """Click logits.

    Args:
      categorical: int [batch, F], field f's value in [0, cardinalities[f]) (0 = out of vocabulary).
      numeric: float [batch, N] (standardised).
      domain: int [batch] domain index in [0, num_domains); needed by assignment='domain' only.
      deterministic: False trains: dropout on, and with 'clusters' the centres are updated (stored when
        `mutable=['clusters']`; the rows are assigned with the updated centres either way).

    Returns:
      (logits [batch] float32, ModelOutput with metrics 'cluster_load' [G] (fraction of rows per group; [1.0] for
      'shared'), 'load_entropy' (nats; log G is balanced) and, for 'clusters', 'cluster_entropy' (mean entropy of r
      per row) and 'centre_similarity' (mean cosine between distinct centres)).
    """
    self._check_inputs(categorical, numeric, domain)
    x = jnp.concatenate([*self._features(categorical), numeric.astype(jnp.dtype(self.dtype))], axis=-1)
    metrics = {}
    if self.assignment == "clusters":
      ids, metrics = self._route(x, deterministic)
    elif self.assignment == "domain":
      ids = domain.astype(jnp.int32)
    else:
      ids = jnp.zeros((x.shape[0],), jnp.int32)
    groups = max(self.num_groups, 1)
    towers = GroupTowers(
      self.tower_shape, self.num_groups, self.dropout_rate, self.dtype, self.param_dtype, name="towers"
    )
    all_logits = towers(x, deterministic)  # [G, B]
    onehot = jax.nn.one_hot(ids, groups, dtype=jnp.float32)  # zero rows for out-of-range domains
    logits = jnp.sum(all_logits.T * onehot, axis=-1)
    sow_output(self, "cluster_ids", ids)
    load = jnp.mean(onehot, axis=0)
    metrics = {**metrics, "cluster_load": load, "load_entropy": _entropy(load)}
    return logits, ModelOutput(metrics=metrics)


def _int_tuple(value, minimum):
  return isinstance(value, (tuple, list)) and all(
    isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value
  )
