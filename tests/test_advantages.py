"""Advantages and group filtering on hand-made reward tables (docs/METHOD.md section 5)."""

import math

import numpy as np
import pytest

from editr1_jax.advantages import AdvantageConfig, compute_advantages
from editr1_jax.data.sampler import GroupedSampler

NO_FILTER = AdvantageConfig(filter="none")


def pop_std(xs):
  m = sum(xs) / len(xs)
  return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def test_global_std_advantages():
  ids = [7, 3, 7, 3, 7, 3]  # interleaved: groups are found by id, not by position
  rewards = [0.2, 0.1, 0.4, 0.1, 0.6, 0.4]
  out = compute_advantages(ids, rewards, cfg=NO_FILTER)
  std_all = pop_std(rewards)  # population std over the whole epoch
  mean = {7: 0.4, 3: 0.2}
  expected = [(r - mean[i]) / (std_all + 1e-4) for i, r in zip(ids, rewards)]
  np.testing.assert_array_equal(out.kept, np.arange(6))
  np.testing.assert_allclose(out.advantages, expected, rtol=1e-6, atol=1e-6)
  assert out.advantages.dtype == np.float32


def test_default_is_paper_global_std():
  cfg = AdvantageConfig()
  assert (cfg.std, cfg.filter, cfg.tau_mu, cfg.tau_sigma, cfg.eps, cfg.rloo) == ("global", "paper", 0.9, 0.05, 1e-4,
                                                                                  False)


def test_same_instruction_on_two_images_is_two_groups():
  # ids are dataset sample ids; two samples may share an instruction text but never an id
  out = compute_advantages(["img_a", "img_a", "img_b", "img_b"], [0.0, 1.0, 0.5, 0.5], cfg=NO_FILTER)
  assert out.stats["groups"] == 2
  np.testing.assert_allclose(out.advantages[2:], 0.0)


def test_per_group_std_advantages():
  ids = [1, 1, 1, 2, 2, 2]
  rewards = [0.2, 0.4, 0.6, 0.1, 0.1, 0.4]
  out = compute_advantages(ids, rewards, cfg=AdvantageConfig(std="group", filter="none"))
  g1, g2 = rewards[:3], rewards[3:]
  expected = [(r - 0.4) / (pop_std(g1) + 1e-4) for r in g1] + [(r - 0.2) / (pop_std(g2) + 1e-4) for r in g2]
  np.testing.assert_allclose(out.advantages, expected, rtol=1e-6, atol=1e-6)


def test_rloo_baseline_is_the_mean_of_the_others():
  ids = [1, 1, 1, 2, 2, 2]
  rewards = [0.2, 0.4, 0.9, 0.1, 0.3, 0.5]
  out = compute_advantages(ids, rewards, cfg=AdvantageConfig(rloo=True, filter="none"))
  std_all = pop_std(rewards)
  expected = []
  for g in (rewards[:3], rewards[3:]):
    for i, r in enumerate(g):
      others = g[:i] + g[i + 1:]
      expected.append((r - sum(others) / len(others)) / (std_all + 1e-4))
  np.testing.assert_allclose(out.advantages, expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Four groups of two: (mean, std) = g1 (.95, .01), g2 (.94, .06), g3 (.50, .01), g4 (.50, .20)
TABLE_IDS = [1, 1, 2, 2, 3, 3, 4, 4]
TABLE_REWARDS = [0.94, 0.96, 0.88, 1.0, 0.49, 0.51, 0.3, 0.7]


@pytest.mark.parametrize("semantics,kept_groups", [
    ("paper", [2, 3, 4]),  # drop when mean > .9 AND std < .05: only g1
    ("public", [4]),  # keep only std > .05 AND mean < .9
    ("none", [1, 2, 3, 4]),
])
def test_filter_semantics(semantics, kept_groups):
  out = compute_advantages(TABLE_IDS, TABLE_REWARDS, cfg=AdvantageConfig(filter=semantics))
  assert sorted({TABLE_IDS[i] for i in out.kept}) == kept_groups
  assert out.stats["groups_filtered"] == 4 - len(kept_groups)
  assert out.stats["kept"] == 2 * len(kept_groups)
  assert out.stats["kept_fraction"] == pytest.approx(len(kept_groups) / 4)
  # advantages are computed before filtering, with the std over the whole epoch
  std_all = pop_std(TABLE_REWARDS)
  means = {1: 0.95, 2: 0.94, 3: 0.5, 4: 0.5}
  expected = [(TABLE_REWARDS[i] - means[TABLE_IDS[i]]) / (std_all + 1e-4) for i in out.kept]
  np.testing.assert_allclose(out.advantages, expected, rtol=1e-5, atol=1e-6)


def test_thresholds_are_configurable():
  out = compute_advantages(TABLE_IDS, TABLE_REWARDS, cfg=AdvantageConfig(tau_mu=0.4, tau_sigma=0.1))
  # paper rule with tau_mu .4, tau_sigma .1: drop g1, g2 (mean > .4, std < .1) and g3; keep g4
  assert sorted({TABLE_IDS[i] for i in out.kept}) == [4]


@pytest.mark.parametrize("semantics,dropped,banned", [
    ("paper", [1], [1]),  # drops and bans on AND: mean > .9 AND std < .05
    # drops on OR (g2 for its mean alone, g3 for its std alone) but bans on AND, as the public stat tracker
    ("public", [1, 2, 3], [1]),
    ("none", [], []),
])
def test_drop_and_ban_rules(semantics, dropped, banned):
  out = compute_advantages(TABLE_IDS, TABLE_REWARDS, cfg=AdvantageConfig(filter=semantics, ban_filtered=True))
  assert sorted(set(TABLE_IDS) - {TABLE_IDS[i] for i in out.kept}) == dropped
  assert sorted(out.to_ban.tolist()) == banned and out.stats["banned"] == len(banned)
  assert compute_advantages(TABLE_IDS, TABLE_REWARDS, cfg=AdvantageConfig(filter=semantics)).to_ban.size == 0


def test_banned_ids_stay_out_of_later_epochs():
  out = compute_advantages(TABLE_IDS, TABLE_REWARDS, cfg=AdvantageConfig(tau_mu=0.4, tau_sigma=0.1, ban_filtered=True))
  assert sorted(out.to_ban.tolist()) == [1, 2, 3]

  sampler = GroupedSampler(num_records=6, groups_per_epoch=3, group_size=2, seed=0)
  sampler.ban(out.to_ban)
  restored = GroupedSampler(num_records=6, groups_per_epoch=3, group_size=2, seed=0)
  restored.restore({k: np.asarray(v) for k, v in sampler.state().items()})  # plain arrays: checkpointable
  for epoch in range(5):
    assert not set(restored.epoch_records(epoch).tolist()) & {1, 2, 3}


# --------------------------------------------------------------------------------------------------
def test_invalid_rewards_are_masked_never_zero():
  nan = float("nan")
  ids = [1, 1, 1, 2, 2, 2, 3, 3, 4, 4]
  rewards = [0.2, 0.0, 0.6, 0.3, nan, 0.5, nan, nan, 0.7, 0.0]
  valid = [True, False, True, True, True, True, True, True, True, False]
  out = compute_advantages(ids, rewards, valid, cfg=NO_FILTER)
  # group 1: stats over {0.2, 0.6} (the invalid 0.0 is not a reward); group 2: over {0.3, 0.5};
  # group 3 has no valid reward (dropped); group 4 has one (no comparison: dropped)
  good = [0.2, 0.6, 0.3, 0.5, 0.7]
  std_all = pop_std(good)
  np.testing.assert_array_equal(out.kept, [0, 2, 3, 5])
  np.testing.assert_allclose(out.advantages, [(0.2 - 0.4) / (std_all + 1e-4), (0.6 - 0.4) / (std_all + 1e-4),
                                              (0.3 - 0.4) / (std_all + 1e-4), (0.5 - 0.4) / (std_all + 1e-4)],
                             rtol=1e-6)
  s = out.stats
  assert (s["invalid_rewards"], s["groups_all_invalid"], s["groups_too_small"], s["groups"]) == (5, 1, 1, 4)
  assert s["reward_mean"] == pytest.approx(np.mean(good)) and s["reward_std"] == pytest.approx(std_all)
  assert (s["reward_min"], s["reward_max"]) == (0.2, 0.7)
  assert np.isfinite(out.advantages).all()


def test_reward_diagnostics_of_the_public_code():
  nan = float("nan")
  ids = [1, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 5, 5]
  rewards = [0.1, 0.1, 0.1, 0.2, 0.4, 0.6, 0.8, 0.5, nan, nan, nan, 0.3, 0.9]
  s = compute_advantages(ids, rewards, cfg=NO_FILTER).stats
  # group 4 has no valid reward: not counted. Groups 1 (equal rewards, whose float std is 1e-17, not 0) and
  # 3 (one valid reward) have zero std
  assert s["zero_std_ratio"] == 0.5
  assert s["reward_std_mean"] == pytest.approx((0 + pop_std([0.2, 0.4, 0.6, 0.8]) + 0 + 0.3) / 4)
  # per group, the mean of the rewards at or above the (100 - p)th linear percentile, then the mean over groups;
  # group 2's thresholds for p = 10, 25, 50, 75: .74, .65, .5, .35; group 5's: .84, .75, .6, .45
  expected = {100: (0.1 + 0.5 + 0.5 + 0.6) / 4, 75: (0.1 + 0.6 + 0.5 + 0.9) / 4, 50: (0.1 + 0.7 + 0.5 + 0.9) / 4,
              25: (0.1 + 0.8 + 0.5 + 0.9) / 4, 10: (0.1 + 0.8 + 0.5 + 0.9) / 4}
  for p, value in expected.items():
    assert s[f"mean_reward_{p}"] == pytest.approx(value), p


def test_invalid_groups_are_not_banned():
  out = compute_advantages([1, 1, 2, 2], [float("nan"), float("nan"), 0.95, 0.95],
                           cfg=AdvantageConfig(ban_filtered=True))
  assert out.to_ban.tolist() == [2]  # group 2 filtered (mean .95, std 0); group 1 only failed to score
  assert out.kept.size == 0


def test_nothing_valid():
  out = compute_advantages([1, 1], [0.5, 0.5], [False, False])
  assert out.kept.size == 0 and out.stats["kept_fraction"] == 0.0
  assert math.isnan(out.stats["reward_mean"]) and math.isnan(out.stats["zero_std_ratio"])
  assert math.isnan(out.stats["mean_reward_10"])
  indices, advantages, mask = out.micro_batches(4)
  assert indices.shape == advantages.shape == mask.shape == (0, 4)


# --------------------------------------------------------------------------------------------------
def test_micro_batches_hold_only_kept_rollouts():
  out = compute_advantages(TABLE_IDS, TABLE_REWARDS)  # paper: g1 (rollouts 0, 1) dropped
  indices, advantages, mask = out.micro_batches(4)
  assert indices.shape == (2, 4)
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [1, 1, 0, 0]])
  assert sorted(indices[mask == 1].tolist()) == [2, 3, 4, 5, 6, 7]
  assert advantages[1, 2] == advantages[1, 3] == 0.0
  lookup = dict(zip(out.kept.tolist(), out.advantages.tolist()))
  for i, a in zip(indices[mask == 1], advantages[mask == 1]):
    assert a == lookup[int(i)]
  shuffled, _, smask = out.micro_batches(4, np.random.default_rng(0))
  assert sorted(shuffled[smask == 1].tolist()) == [2, 3, 4, 5, 6, 7]


def test_bad_input_names_the_field():
  with pytest.raises(ValueError, match="std"):
    AdvantageConfig(std="batch")
  with pytest.raises(ValueError, match="filter"):
    AdvantageConfig(filter="strict")
  with pytest.raises(ValueError, match="rewards"):
    compute_advantages([1, 1, 2], [0.1, 0.2])
  with pytest.raises(ValueError, match="micro-batch"):
    compute_advantages([1, 1], [0.1, 0.2]).micro_batches(0)
