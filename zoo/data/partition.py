"""K-means partition of an image dataset into clusters (`config.data.clusters`, `config.data.cluster`).

Decentralized Diffusion Models (McAllister et al. 2025, papers.md D1) train one flow-matching expert per cluster of
the data and a router that predicts the cluster of x0. The paper clusters on the features of a pretrained image
encoder; here the features are the pixels themselves [guess: no pretrained encoder is available offline], scaled to
[0, 1] and flattened. The centroids come from scikit-learn's `KMeans` (k-means++ init, 10 restarts, seed 0) fit on
the dataset's train split, so every process that reads the data (each expert's own run) computes the same partition
with no communication; an example of any split belongs to its nearest centroid.
"""

import numpy as np


def flat_images(source, indices):
  """float32 [N, H*W*C] of the records `indices` of `source` (uint8 scaled to [0, 1])."""
  rows = []
  for i in indices:
    image = np.asarray(source[i]["image"])
    rows.append((image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)).ravel())
  return np.stack(rows)


_CENTROIDS = {}  # (dataset key, k) -> centroids, per process


def centroids(key, k, features_fn):
  """The k-means centroids [k, D] of the train features `features_fn()` ([N, D]), computed once per (`key`, k)."""
  if (key, k) not in _CENTROIDS:
    _CENTROIDS[(key, k)] = fit(features_fn(), k)
  return _CENTROIDS[(key, k)]


def fit(features, k):
  """scikit-learn k-means (k-means++, 10 restarts, seed 0) of `features` [N, D] -> centroids [k, D] float32."""
  from sklearn.cluster import KMeans  # pylint: disable=g-import-not-at-top

  if len(features) < k:
    raise ValueError(f"data config: clusters={k} but the train split has only {len(features)} examples")
  return KMeans(n_clusters=k, n_init=10, random_state=0).fit(features).cluster_centers_.astype(np.float32)


def assign(features, centroids_):
  """The nearest centroid of each row: features [N, D], centroids [k, D] -> int32 [N]."""
  d = np.sum(features**2, axis=1, keepdims=True) - 2.0 * features @ centroids_.T + np.sum(centroids_**2, axis=1)[None]
  return np.argmin(d, axis=1).astype(np.int32)
