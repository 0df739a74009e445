"""Routers of mixtures of LoRA experts (LoRA-Mixer, DynMoLE, GLIDER) on small cases worked out by hand."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from zoo.routing import lora_routers


def logits_of(probs):
  """Logits whose softmax is `probs` (rows summing to 1)."""
  return jnp.log(jnp.asarray(probs, jnp.float32))


def tsallis_11(p):
  """Normalised Tsallis entropy, q = 1.1, no eps: (1 - sum p^1.1) / 0.1 over (1 - N^-0.1) / 0.1, in float64."""
  p = np.asarray(p, np.float64)
  return (1 - np.sum(p**1.1)) / (1 - len(p) ** -0.1)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA-Mixer: top-k, softmax over the selected logits, lambda_b * load balance + lambda_h * mean entropy.


def test_lora_mixer_top2_weights_and_specialization_balance_loss():
  # token 0: p = [0.5, 0.3, 0.15, 0.05] -> experts 0, 1 with 0.5/0.8 = 0.625 and 0.3/0.8 = 0.375
  # token 1: p = [0.4, 0.3, 0.2, 0.1]   -> experts 0, 1 with 0.4/0.7 = 4/7 and 0.3/0.7 = 3/7
  routing = lora_routers.lora_mixer(
    logits_of([[0.5, 0.3, 0.15, 0.05], [0.4, 0.3, 0.2, 0.1]]), 2, load_balance_coef=0.1, entropy_coef=0.5
  )
  np.testing.assert_array_equal(routing.expert_ids, [[0, 1], [0, 1]])
  np.testing.assert_allclose(routing.weights, [[0.625, 0.375, 0, 0], [4 / 7, 3 / 7, 0, 0]], rtol=1e-6, atol=1e-7)
  # f = [2/4, 2/4, 0, 0] (4 assignments, 2 each to experts 0 and 1); P = mean p = [0.45, 0.3, 0.175, 0.075];
  # E * sum f P = 4 * (0.5 * 0.45 + 0.5 * 0.3) = 4 * 0.375 = 1.5
  np.testing.assert_allclose(routing.aux["load_balance"], 1.5, rtol=1e-6)
  # H0 = 0.346574 + 0.361192 + 0.284568 + 0.149787 = 1.142121 nats; H1 = 0.366516 + 0.361192 + 0.321888 + 0.230259
  # = 1.279854; mean = 1.210987
  np.testing.assert_allclose(routing.aux["entropy"], 1.210987, rtol=1e-5)
  # 0.1 * 1.5 + 0.5 * 1.210987 = 0.15 + 0.605494 = 0.755494
  np.testing.assert_allclose(routing.aux_loss, 0.755494, rtol=1e-5)


def test_lora_mixer_top1_and_default_coefficients():
  # top-1: the argmax expert with weight 1 (softmax over one selected logit); token 1's argmax is expert 2.
  # Both tokens on different experts: f = [1/2, 0, 1/2, 0], P = [(0.7 + 0.2) / 2, (0.1 + 0.1) / 2, (0.1 + 0.6) / 2,
  # (0.1 + 0.1) / 2] = [0.45, 0.1, 0.35, 0.1]; E * sum f P = 4 * (0.225 + 0.175) = 1.6.
  # H = -(0.7 ln 0.7 + 3 * 0.1 ln 0.1) = 0.249672 + 0.690776 = 0.940448 and -(0.6 ln 0.6 + 0.2 ln 0.2 + 2 * 0.1 ln 0.1)
  # = 0.306495 + 0.321888 + 0.460517 = 1.088900; mean 1.014674. Defaults 0.01 and 0.01: 0.016 + 0.0101467.
  routing = lora_routers.lora_mixer(logits_of([[0.7, 0.1, 0.1, 0.1], [0.2, 0.1, 0.6, 0.1]]), 1)
  np.testing.assert_array_equal(routing.expert_ids, [[0], [2]])
  np.testing.assert_allclose(routing.weights, [[1, 0, 0, 0], [0, 0, 1, 0]], atol=1e-7)
  np.testing.assert_allclose(routing.aux["load_balance"], 1.6, rtol=1e-6)
  np.testing.assert_allclose(routing.aux["entropy"], 1.014674, rtol=1e-5)
  np.testing.assert_allclose(routing.aux_loss, 0.016 + 0.01014674, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# DynMoLE: top-p (the expert that crosses top_p is dropped) with keep_top_k, the Tsallis switch to all experts.


def test_tsallis_entropy_limits():
  # uniform: sum (1/N)^q = N^(1-q), so the entropy is its maximum (normalised 1); one-hot: sum p^q = 1 -> 0.
  uniform = jnp.full((1, 5), 0.2)
  one_hot = jnp.asarray([[0.0, 1.0, 0.0, 0.0, 0.0]])
  for q in (1.1, 1.0, 2.0):
    np.testing.assert_allclose(lora_routers.tsallis_entropy(uniform, q, eps=0.0), [1.0], rtol=1e-5)
    np.testing.assert_allclose(lora_routers.tsallis_entropy(one_hot, q, eps=0.0), [0.0], atol=1e-6)
  # q = 2 unnormalised: 1 - sum p^2 = 1 - (0.25 + 0.09 + 0.04) = 0.62 for p = [0.5, 0.3, 0.2].
  p = jnp.asarray([[0.5, 0.3, 0.2]])
  np.testing.assert_allclose(lora_routers.tsallis_entropy(p, 2.0, eps=0.0, normalize=False), [0.62], rtol=1e-6)


def test_dynmole_top_p_keeps_at_least_keep_top_k():
  # p = [0.5, 0.3, 0.15, 0.05]: cumulative [0.5, 0.8, 0.95, 1.0]; <= 0.75 keeps expert 0 only, keep_top_k = 2 adds
  # expert 1. Normalised Tsallis entropy: sum p^1.1 = 0.466516 + 0.265970 + 0.124080 + 0.037057 = 0.893623,
  # (1 - 0.893623) / 0.1 = 1.06377 over (1 - 4^-0.1) / 0.1 = 1.29449 -> 0.8218 <= 0.9: no switch. Weights are p on the
  # kept experts, not renormalised.
  logits = logits_of([[0.5, 0.3, 0.15, 0.05]])
  routing = lora_routers.dynmole(logits)
  np.testing.assert_array_equal(routing.expert_ids, [[0, 1, -1, -1]])
  np.testing.assert_allclose(routing.weights, [[0.5, 0.3, 0, 0]], rtol=1e-6, atol=1e-7)
  # keep_top_k = 1: only the top-p set, expert 0.
  routing = lora_routers.dynmole(logits, keep_top_k=1)
  np.testing.assert_array_equal(routing.expert_ids, [[0, -1, -1, -1]])
  np.testing.assert_allclose(routing.weights, [[0.5, 0, 0, 0]], rtol=1e-6, atol=1e-7)


def test_dynmole_drops_the_expert_that_crosses_top_p():
  # Sorted p = [0.4 (e2), 0.2 (e0), 0.14 (e5), 0.12 (e1), 0.08 (e3), 0.06 (e4)]; cumulative
  # [0.4, 0.6, 0.74, 0.86, 0.94, 1.0]: 0.74 <= 0.75 keeps e2, e0, e5; e1 takes the sum past 0.75 and is dropped.
  # Entropy: sum p^1.1 = 0.364977 + 0.170268 + 0.115011 + 0.097073 + 0.062144 + 0.045286 = 0.854760,
  # 1.45240 / ((1 - 6^-0.1) / 0.1 = 1.64041) = 0.8854 <= 0.9.
  probs = [0.2, 0.12, 0.4, 0.08, 0.06, 0.14]
  routing = lora_routers.dynmole(logits_of([probs]))
  np.testing.assert_array_equal(routing.expert_ids, [[2, 0, 5, -1, -1, -1]])
  np.testing.assert_allclose(routing.weights, [[0.2, 0, 0.4, 0, 0, 0.14]], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(routing.metrics["active_experts"], 3.0)
  # The same token with the threshold at 0.88 (< 0.8854): all six experts, in descending probability, weights p.
  routing = lora_routers.dynmole(logits_of([probs]), entropy_threshold=0.88)
  np.testing.assert_array_equal(routing.expert_ids, [[2, 0, 5, 1, 3, 4]])
  np.testing.assert_allclose(routing.weights, [probs], rtol=1e-6)
  np.testing.assert_allclose(routing.metrics["all_experts_fraction"], 1.0)


def test_dynmole_entropy_switch_near_uniform_vs_peaked():
  # near uniform p = [0.3, 0.26, 0.24, 0.2]: top-p alone keeps 2 (cumulative 0.3, 0.56, 0.80, ...), but
  # sum p^1.1 = 0.265970 + 0.227233 + 0.208081 + 0.170268 = 0.871552, 1.28448 / 1.29449 = 0.9923 > 0.9: all experts.
  # peaked p = [0.85, 0.05, 0.05, 0.05]: keep_top_k = 2 experts; sum p^1.1 = 0.836298 + 3 * 0.037057 = 0.947468,
  # 0.52532 / 1.29449 = 0.4058 < 0.9: no switch.
  routing = lora_routers.dynmole(logits_of([[0.3, 0.26, 0.24, 0.2], [0.05, 0.85, 0.05, 0.05]]), entropy_eps=0.0)
  np.testing.assert_array_equal(routing.expert_ids[0], [0, 1, 2, 3])
  np.testing.assert_allclose(routing.weights[0], [0.3, 0.26, 0.24, 0.2], rtol=1e-6)
  assert routing.expert_ids[1, 0] == 1 and routing.expert_ids[1, 1] in (0, 2, 3)
  np.testing.assert_array_equal(routing.expert_ids[1, 2:], [-1, -1])
  assert np.count_nonzero(np.asarray(routing.weights[1])) == 2
  np.testing.assert_allclose(routing.metrics["all_experts_fraction"], 0.5)
  # A threshold >= 1 turns the switch off (as in the authors' code): the near-uniform token keeps 2.
  routing = lora_routers.dynmole(logits_of([[0.3, 0.26, 0.24, 0.2]]), entropy_threshold=1.0)
  np.testing.assert_array_equal(routing.expert_ids, [[0, 1, -1, -1]])


def test_dynmole_losses_by_hand():
  # Two tokens: a = [0.5, 0.3, 0.15, 0.05] keeps experts 0, 1 (w = [0.5, 0.3, 0, 0]); b = [0.3, 0.26, 0.24, 0.2] uses
  # all (w = b). mean w = [0.4, 0.28, 0.12, 0.1], mean p = [0.4, 0.28, 0.195, 0.125];
  # E * sum = 4 * (0.16 + 0.0784 + 0.0234 + 0.0125) = 4 * 0.2743 = 1.0972.
  # Entropy (eps 0): (0.82176 + 0.99226) / 2 = 0.90701 (tsallis_11 below in float64 for more digits).
  a, b = [0.5, 0.3, 0.15, 0.05], [0.3, 0.26, 0.24, 0.2]
  routing = lora_routers.dynmole(logits_of([a, b]), entropy_eps=0.0)
  np.testing.assert_allclose(routing.aux["load_balance"], 1.0972, rtol=1e-5)
  entropy = (tsallis_11(a) + tsallis_11(b)) / 2
  np.testing.assert_allclose(entropy, 0.90701, atol=5e-5)  # the hand figure
  np.testing.assert_allclose(routing.aux["entropy"], entropy, rtol=1e-5)
  np.testing.assert_allclose(routing.aux_loss, 0.01 * entropy + 0.001 * 1.0972, rtol=1e-5)


def test_dynmole_default_eps_lowers_the_entropy_slightly():
  # eps = 1e-5 is added to every p before the sum: sum (p + eps)^1.1 grows by about 1.1 * sum p^0.1 * eps, here
  # ~4.3e-5, so the normalised entropy drops by ~4.3e-5 / 0.1 / 1.29449 = 3.3e-4.
  p = [0.5, 0.3, 0.15, 0.05]
  routing = lora_routers.dynmole(logits_of([p]))
  drop = tsallis_11(p) - float(routing.aux["entropy"])
  assert 2.5e-4 < drop < 4e-4, drop


def test_dynmole_rejects_bad_arguments():
  with pytest.raises(ValueError, match="at least 2 experts"):
    lora_routers.dynmole(jnp.zeros((3, 1)))
  with pytest.raises(ValueError, match="top_p"):
    lora_routers.dynmole(jnp.zeros((3, 4)), top_p=0.0)
  with pytest.raises(ValueError, match="keep_top_k"):
    lora_routers.dynmole(jnp.zeros((3, 4)), keep_top_k=0)


# ---------------------------------------------------------------------------------------------------------------------
# GLIDER: local logits LN(h) W / sqrt(d), cosine task bias, logits + s * bias, softmax, top-2, renormalised.


def test_glider_local_logits_by_hand():
  # h = [1, 2, 3, 4]: mean 2.5, variance 1.25, LN(h) = [-1.5, -0.5, 0.5, 1.5] / sqrt(1.25 + 1e-5).
  # Gate vectors: e0 = [0, 0, 0, 1] -> 1.5 / 1.118039 / sqrt(4) = 0.670817; e1 = [1, 1, 1, 1] -> 0 (LN sums to 0);
  # e2 = [1, -1, 0, 0] -> (-1.5 + 0.5) / 1.118039 / 2 = -0.447211.
  gate = jnp.asarray([[0, 1, 1], [0, 1, -1], [0, 1, 0], [1, 1, 0]], jnp.float32)
  h = jnp.asarray([[1.0, 2.0, 3.0, 4.0]])
  expected = [[1.5 / math.sqrt(1.25 + 1e-5) / 2, 0.0, -1.0 / math.sqrt(1.25 + 1e-5) / 2]]
  np.testing.assert_allclose(lora_routers.glider_local_logits(h, gate), expected, rtol=1e-5, atol=1e-6)
  # no affine parameters: a shifted and scaled input gives the same logits.
  np.testing.assert_allclose(lora_routers.glider_local_logits(10 * h + 3, gate), expected, rtol=1e-4, atol=1e-5)


def test_glider_task_bias_is_cosine_similarity():
  experts = jnp.asarray([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
  # query [3, 4] (norm 5): cos = [3/5, 4/5, 7 / (5 sqrt 2) = 0.989949]
  np.testing.assert_allclose(
    lora_routers.glider_task_bias(experts, jnp.asarray([3.0, 4.0])), [0.6, 0.8, 0.989949], rtol=1e-5
  )
  # one query per sequence: [1, 0] -> [1, 0, 1/sqrt 2]
  np.testing.assert_allclose(
    lora_routers.glider_task_bias(experts, jnp.asarray([[3.0, 4.0], [1.0, 0.0]])),
    [[0.6, 0.8, 0.989949], [1.0, 0.0, 0.707107]],
    rtol=1e-5,
    atol=1e-7,
  )


def test_glider_bias_flips_the_top2_at_scale_100_not_at_3():
  # l = [2, 1, 0], bias = [0, 0, 0.05].
  # s = 3:   logits [2, 1, 0.15] -> top-2 {0, 1}, weights e^2 / (e^2 + e^1) = 1 / (1 + e^-1) = 0.731059, 0.268941.
  # s = 100: logits [2, 1, 5]    -> top-2 {2, 0}, weights 1 / (1 + e^-3) = 0.952574, 0.047426.
  local = jnp.asarray([[2.0, 1.0, 0.0]])
  bias = jnp.asarray([0.0, 0.0, 0.05])
  held_out = lora_routers.glider(local, bias, lora_routers.GLIDER_SCALE_HELD_OUT)
  np.testing.assert_array_equal(held_out.expert_ids, [[0, 1]])
  np.testing.assert_allclose(held_out.weights, [[0.731059, 0.268941, 0.0]], rtol=1e-5, atol=1e-7)
  held_in = lora_routers.glider(local, bias, lora_routers.GLIDER_SCALE_HELD_IN)
  np.testing.assert_array_equal(held_in.expert_ids, [[2, 0]])
  np.testing.assert_allclose(held_in.weights, [[0.047426, 0.0, 0.952574]], rtol=1e-5, atol=1e-7)
  assert held_in.aux == {} and float(held_in.aux_loss) == 0.0


def test_glider_one_bias_per_sequence():
  # 2 sequences x 2 tokens, every token l = [2, 1, 0]; s = 100.
  # sequence 0, bias [0, 0, 0.05]: logits [2, 1, 5] -> [2, 0]; sequence 1, bias [0, 0.05, 0]: [2, 6, 0] -> [1, 0].
  local = jnp.tile(jnp.asarray([[2.0, 1.0, 0.0]]), (4, 1))
  bias = jnp.asarray([[0.0, 0.0, 0.05], [0.0, 0.05, 0.0]])
  routing = lora_routers.glider(local, bias, 100.0)
  np.testing.assert_array_equal(routing.expert_ids, [[2, 0], [2, 0], [1, 0], [1, 0]])
  with pytest.raises(ValueError, match="bias must be"):
    lora_routers.glider(jnp.zeros((3, 3)), bias, 100.0)  # 2 sequences do not divide 3 tokens
