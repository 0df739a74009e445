"""Router-R1 (`zoo.routing.router_r1`): the reward on hand-written trajectories, the observation mask of the loss,
GRPO's advantages, the environment's insertions, and a short training run on a two-member environment."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.models import ConfigError
from zoo.routing import model_routers as mr, router_r1 as r1
from zoo.routing.router_r1 import ANSWER, ANSWER_END, EOS, INFO, INFO_END, QUERY, SEARCH, SEARCH_END, THINK, THINK_END

V3 = r1.Vocab(num_members=3, num_thoughts=2, num_bins=4)
M = [V3.first_member + k for k in range(3)]  # member tokens
B = [V3.first_bin + b for b in range(4)]  # observation tokens
T0 = V3.first_thought


def rows(*trajectories, length=None):
  length = length or r1.max_length(4)
  out = np.zeros((len(trajectories), length), np.int32)
  for i, t in enumerate(trajectories):
    out[i, : len(t) + 1] = [QUERY, *t]
  return out


def search(k, b=0):
  return [SEARCH, M[k], SEARCH_END, INFO, B[b], INFO_END]


def test_parse_reads_format_answer_and_searches():
  parsed = r1.parse(
    rows(
      [THINK, T0, THINK_END, *search(1, 3), ANSWER, M[1], ANSWER_END],  # valid, answers 1
      [ANSWER, M[0], SEARCH_END],  # malformed answer turn: invalid, no answer
      [THINK, T0, THINK_END, EOS],  # valid, no answer
      [*search(0), *search(2), ANSWER, M[2], ANSWER_END, THINK],  # trailing turn after the answer: invalid
      [THINK, T0, THINK_END] * 4 + [ANSWER, M[0], ANSWER_END],  # a fifth turn: invalid, the answer still read
      [*search(0)] * 4,  # stops at the turn limit: valid, no answer
      [SEARCH, M[1], SEARCH_END, ANSWER, M[1], ANSWER_END],  # a search without its observation is not run
    ),
    V3,
    max_turns=4,
  )
  assert parsed.valid.tolist() == [True, False, True, False, False, True, False]
  assert parsed.answer.tolist() == [1, -1, -1, 2, 0, -1, 1]
  assert parsed.calls.tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 0], [1, 0, 1], [0, 0, 0], [4, 0, 0], [0, 0, 0]]
  assert parsed.last_search.tolist() == [1, -1, -1, 2, -1, 0, -1]
  assert parsed.turns.tolist()[0] == 3


def test_reward_cases_and_cost_term():
  a = 0.4
  # The paper's cases written out: no answer f(1-a), correct (1+f)(1-a) + a c, wrong f.
  f = np.array([0.0, -1.0, 0.0, -1.0, 0.0, -1.0])
  answered = np.array([False, False, True, True, True, True])
  correct = np.array([False, False, True, True, False, False])
  c = np.array([0.3, 0.3, 0.5, 0.5, 0.9, 0.9])
  np.testing.assert_allclose(r1.reward(f, answered, correct, c, a), [0.0, -0.6, 0.8, 0.2, 0.0, -1.0])
  # c = 1 - (sqrt(C) - sqrt(c_min)) / (sqrt(c_max) - sqrt(c_min)), clipped: costs 1, 4, 9 -> sqrt 1, 2, 3.
  member_cost = np.tile([1.0, 4.0, 9.0], (4, 1))
  np.testing.assert_allclose(r1.cost_term([1.0, 4.0, 9.0, 13.0], member_cost), [1.0, 0.5, 0.0, 0.0])


def test_episode_rewards_on_hand_written_trajectories():
  quality = np.tile([0.5, 0.9, 0.95], (7, 1))
  cost = np.tile([1.0, 4.0, 9.0], (7, 1))
  a, margin = 0.4, 0.1
  parsed = r1.parse(
    rows(
      [*search(1), ANSWER, M[1], ANSWER_END],  # correct (0.9 >= 0.95 - 0.1), c = 0.5: 0.6 + 0.2
      [*search(0), ANSWER, M[0], ANSWER_END],  # wrong, valid: 0
      [*search(0), *search(2), ANSWER, M[2], ANSWER_END],  # correct, paid 1 + 9 > c_max: c = 0 -> 0.6
      [*search(0), ANSWER, M[1], ANSWER_END],  # answers a member it never ran: wrong -> 0
      [*search(1), ANSWER, M[1], ANSWER_END, EOS],  # correct but invalid: (1 - 1)(1 - a) + a c = 0.2
      [THINK, T0],  # no answer, invalid: -(1 - a)
      [*search(0), *search(0), ANSWER, M[0], ANSWER_END],  # correct (quality set to 0.9 below), paid twice
    ),
    V3,
    max_turns=4,
  )
  quality[6, 0] = 0.9
  c = 1.0 - (np.sqrt(2.0) - 1.0) / (3.0 - 1.0)  # member 0 run twice: sqrt(1 + 1) between sqrt(1) and sqrt(9)
  want = [0.8, 0.0, 0.6, 0.0, 0.2, -0.6, 0.6 + a * c]
  np.testing.assert_allclose(r1.episode_rewards(parsed, quality, cost, a, margin), want)
  # The router's decision pays every call too (plus the features).
  data = mr.RoutingData(
    quality, cost, np.zeros((7, 1)), np.full(7, 0.5), np.zeros((7, 3)), np.zeros(7, int), ("s", "m", "l")
  )
  decision = r1.CallsDecision(np.zeros(7, int), parsed.calls > 0, uses_features=True, calls=parsed.calls)
  np.testing.assert_allclose(decision.cost(data), [4.5, 1.5, 10.5, 1.5, 4.5, 0.5, 2.5])


def test_group_advantages():
  adv = r1.group_advantages([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, -1.0, 0.0, 1.0, 0.0], 4)
  s = np.sqrt(0.5)  # the third group: mean 0, std sqrt(2/4)
  np.testing.assert_allclose(adv, [1, -1, -1, 1, 0, 0, 0, 0, -1 / s, 0, 1 / s, 0], atol=1e-5)
  centred = r1.group_advantages([1.0, 0.0, 0.0, 1.0, 0.1, 0.0, 0.0, 0.1], 4, scale=False)  # Dr. GRPO
  np.testing.assert_allclose(centred, [0.5, -0.5, -0.5, 0.5, 0.05, -0.05, -0.05, 0.05], atol=1e-12)


def test_loss_ignores_observation_tokens_exactly():
  tokens = jnp.asarray(
    rows([*search(1, 2), ANSWER, M[1], ANSWER_END], [THINK, T0, THINK_END, *search(0, 1)], length=12)
  )
  observed = np.isin(np.asarray(tokens), [INFO, INFO_END, *B]) & (np.arange(12) >= 4)
  generated = (np.asarray(tokens) != 0) & (np.asarray(tokens) != QUERY) & ~observed
  assert observed.sum() == 6 and generated.sum() == 12
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 12, V3.size))
  old = r1.token_logprobs(logits + 0.3 * jax.random.normal(jax.random.PRNGKey(1), logits.shape), tokens)
  ref = r1.token_logprobs(logits * 0.5, tokens)
  adv = jnp.array([1.5, -0.5])

  def loss(lg):
    return r1.grpo_loss(lg, tokens, generated, adv, old, ref, clip_eps=0.2, kl_coef=0.1)[0]

  grad = np.asarray(jax.grad(loss)(logits))
  # Logits at position t predict token t + 1: those predicting an observation token get no gradient at all.
  predicts_obs = np.zeros((2, 12), bool)
  predicts_obs[:, :-1] = observed[:, 1:]
  predicts_gen = np.zeros((2, 12), bool)
  predicts_gen[:, :-1] = generated[:, 1:]
  assert np.all(grad[predicts_obs] == 0.0)
  assert np.all(np.abs(grad[predicts_gen]).sum(-1) > 0)
  # Any change of the logits (hence of the log-probs) at observation positions leaves the loss unchanged, exactly.
  noise = 5.0 * jax.random.normal(jax.random.PRNGKey(2), logits.shape)
  moved = jnp.where(jnp.asarray(predicts_obs)[..., None], logits + noise, logits)
  assert float(loss(moved)) == float(loss(logits))
  assert float(loss(logits + noise)) != float(loss(logits))
  # With the observations in the mask the loss would change: the mask is what excludes them.
  leaky = r1.grpo_loss(moved, tokens, generated | observed, adv, old, ref, clip_eps=0.2, kl_coef=0.1)[0]
  assert float(leaky) != float(r1.grpo_loss(logits, tokens, generated | observed, adv, old, ref, kl_coef=0.1)[0])


class Scripted(nn.Module):
  """A 'policy' whose logits at position t put all their mass on script[t + 1]."""

  script: tuple
  vocab_size: int

  def __call__(self, tokens, features, cost_weight):
    del features, cost_weight
    target = jnp.asarray(self.script[1:] + (0,))[: tokens.shape[1]]
    return jnp.broadcast_to(10.0 * jax.nn.one_hot(target, self.vocab_size), (*tokens.shape, self.vocab_size))


def test_rollout_inserts_observations_and_stops_at_the_answer():
  length = r1.max_length(2)
  x = 0  # script entries at the observation positions are never used
  script = (QUERY, SEARCH, M[2], SEARCH_END, x, x, x, ANSWER, M[2], ANSWER_END, THINK, THINK, THINK)
  policy = Scripted(script, V3.size)
  observation = np.array([[B[0], B[1], B[3]], [B[2], B[2], B[1]]])
  ep = r1.rollout(policy, {}, np.zeros((2, 1)), np.zeros(2), observation, V3, 2, jax.random.PRNGKey(0), greedy=True)
  assert ep.tokens.shape == (2, length)
  want = [QUERY, SEARCH, M[2], SEARCH_END, INFO, None, INFO_END, ANSWER, M[2], ANSWER_END, 0, 0, 0]
  for r, b in enumerate([B[3], B[1]]):
    want[5] = b
    assert ep.tokens[r].tolist() == want
  assert ep.observed[0].tolist() == [False] * 4 + [True] * 3 + [False] * 6
  assert ep.generated[0].tolist() == [False] + [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3
  parsed = r1.parse(ep.tokens, V3, 2)
  assert parsed.valid.all() and parsed.answer.tolist() == [2, 2]


def toy(q, seed):
  """Two members; the sign of feature 0 says which one is right; the second costs twice the first."""
  rng = np.random.default_rng(seed)
  x = rng.choice([-1.0, 1.0], size=q)
  return mr.RoutingData(
    quality=np.stack([x > 0, x < 0], 1).astype(float),
    cost=np.tile([1.0, 2.0], (q, 1)),
    features=np.stack([x, rng.normal(size=q)], 1),
    feature_cost=np.zeros(q),
    confidence=np.full((q, 2), 0.5),
    category=np.zeros(q, int),
    members=("a", "b"),
  )


def test_grpo_learns_to_route_to_the_right_member():
  train, test = toy(64, 0), toy(32, 1)
  router = r1.RouterR1(
    cost_weights=(0.0,),
    max_turns=2,
    group_size=8,
    queries_per_step=16,
    steps=16,  # rewards rise by 0.88 (24 steps: 1.19); with the advantages negated or zeroed they fall
    format_warmup_steps=40,
    num_layers=1,
    embed_dim=32,
    num_heads=2,
    mlp_dim=64,
    lr=3e-3,
  ).fit(train, seed=0)
  assert router.family == "rl" and mr.MODEL_ROUTERS.get("router_r1") is r1.RouterR1
  first = np.mean([h["reward"] for h in router.history[:4]])
  last = np.mean([h["reward"] for h in router.history[-4:]])
  assert last > first + 0.3, (first, last)
  decision = router.route(test, 0.0)
  assert np.mean(decision.quality(test)) >= 0.9
  assert np.all(decision.ran[np.arange(len(test)), decision.choice])
  _, parsed = router.decode(test, 0.0)
  assert parsed.valid.mean() >= 0.9


def test_bad_options_raise_config_errors():
  with pytest.raises(ConfigError, match="cost_weights"):
    r1.RouterR1(cost_weights=(1.5,))
  with pytest.raises(ConfigError, match="group_size"):
    r1.RouterR1(group_size=1)
  with pytest.raises(ConfigError, match="embed_dim"):
    r1.RouterR1(embed_dim=30, num_heads=4)
