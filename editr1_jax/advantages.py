"""Group-relative advantages and low-variance group filtering (docs/METHOD.md section 5), on the host.

A group is the k rollouts of one dataset sample, keyed by the sample id (never by instruction
text). Invalid rewards (a failed or non-finite score) are masked, never read as 0:
- a group's mean and (population) std are taken over its valid members only;
- an invalid member gets no advantage and is not trained on;
- a group with fewer than 2 valid members has no within-group comparison: it is dropped and
  counted (`groups_all_invalid` for none, `groups_too_small` for one), and is not banned;
- the global std is the population std of all valid rewards of the epoch.
Filtering happens here, before micro-batches exist, so a dropped rollout costs no transformer pass.
The rules (`FILTERS`; groups with 2+ valid rewards, mean and std over those):
- "paper": drop when mean > tau_mu AND std < tau_sigma; ban the same groups;
- "public" (the public code): drop unless std > tau_sigma AND mean < tau_mu (drops on OR), but ban only
  when std < tau_sigma AND mean > tau_mu, as its stat tracker does: a group dropped for a low mean or
  a low std alone comes back in later epochs;
- "none": drop and ban nothing.
Banning is optional (`ban_filtered`): the banned ids come back in `to_ban`; the ban state itself is
the grouped sampler's (`data.sampler.GroupedSampler.ban` / `.state()`), which checkpoints it.
The stats also carry the public code's reward diagnostics (`_group_diagnostics`), over the groups
with at least one valid reward.
"""

import dataclasses

import numpy as np

STD_MODES = ("global", "group")
FILTERS = ("paper", "public", "none")


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
  std: str = "global"  # "global": std over the epoch's valid rewards; "group": the group's own std
  rloo: bool = False  # baseline = mean of the other valid members of the group instead of the group mean
  filter: str = "paper"  # one of FILTERS, drop and ban rules in the module docstring
  tau_mu: float = 0.9
  tau_sigma: float = 0.05
  ban_filtered: bool = False
  eps: float = 1e-4

  def __post_init__(self):
    if self.std not in STD_MODES:
      raise ValueError(f"AdvantageConfig.std must be one of {STD_MODES}, got {self.std!r}")
    if self.filter not in FILTERS:
      raise ValueError(f"AdvantageConfig.filter must be one of {FILTERS}, got {self.filter!r}")


@dataclasses.dataclass(frozen=True)
class EpochAdvantages:
  kept: np.ndarray  # (K,) int64 indices into the epoch's rollouts, ascending
  advantages: np.ndarray  # (K,) float32, aligned with `kept`
  to_ban: np.ndarray  # sample ids of the groups to ban (empty unless ban_filtered), rules in the module docstring
  stats: dict

  def micro_batches(self, size: int, rng: np.random.Generator | None = None):
    """(indices, advantages, mask), each (M, size): the kept rollouts (shuffled by `rng` if given) in
    micro-batches; the last is padded with mask-0 rows. No kept rollout -> M = 0, no work at all."""
    if size < 1:
      raise ValueError(f"micro-batch size must be positive, got {size}")
    order = np.arange(len(self.kept)) if rng is None else rng.permutation(len(self.kept))
    m = -(-len(order) // size)
    pad = m * size - len(order)
    mask = np.concatenate([np.ones(len(order), np.float32), np.zeros(pad, np.float32)]).reshape(m, size)
    order = np.concatenate([order, np.zeros(pad, order.dtype)]).astype(np.int64)
    indices = self.kept[order].reshape(m, size)
    advantages = (self.advantages[order] * mask.ravel()).reshape(m, size).astype(np.float32)
    return indices, advantages, mask


def _group_stats(inverse: np.ndarray, rewards: np.ndarray, valid: np.ndarray, n_groups: int):
  """Per group: valid count, mean and population std over the valid members."""
  count = np.bincount(inverse, weights=valid.astype(np.float64), minlength=n_groups)
  total = np.bincount(inverse, weights=rewards, minlength=n_groups)
  mean = total / np.maximum(count, 1)
  sq = np.bincount(inverse, weights=valid * (rewards - mean[inverse]) ** 2, minlength=n_groups)
  return count, total, mean, np.sqrt(sq / np.maximum(count, 1))


def _saturated(mean: np.ndarray, std: np.ndarray, cfg: AdvantageConfig) -> np.ndarray:
  """High mean AND low std: the paper's drop rule, and what both modes ban."""
  return (mean > cfg.tau_mu) & (std < cfg.tau_sigma)


def _dropped(mean: np.ndarray, std: np.ndarray, cfg: AdvantageConfig) -> np.ndarray:
  if cfg.filter == "paper":
    return _saturated(mean, std, cfg)
  if cfg.filter == "public":
    return ~((std > cfg.tau_sigma) & (mean < cfg.tau_mu))
  return np.zeros(mean.shape, bool)


TOP_PERCENTS = (100, 75, 50, 25, 10)


def _group_diagnostics(inverse: np.ndarray, rewards: np.ndarray, valid: np.ndarray, std: np.ndarray) -> dict:
  """The public code's reward diagnostics, over the groups with a valid reward (NaN when there is none):
  `zero_std_ratio` the fraction of groups whose valid rewards are all equal (one valid reward included;
  compared exactly: a float std of equal values need not be 0), `reward_std_mean` the mean group std, and
  `mean_reward_<p>` the mean over groups of the mean of the group's rewards at or above its (100 - p)th
  percentile (numpy's linear one, as the public code)."""
  counts = np.bincount(inverse[valid], minlength=len(std))
  order = np.argsort(inverse[valid], kind="stable")
  groups = [g for g in np.split(rewards[valid][order], np.cumsum(counts)[:-1]) if g.size]
  if not groups:
    return dict(zero_std_ratio=float("nan"), reward_std_mean=float("nan"),
                **{f"mean_reward_{p}": float("nan") for p in TOP_PERCENTS})
  top = lambda g, p: g[g >= np.percentile(g, 100 - p)].mean()
  return dict(zero_std_ratio=float(np.mean([g.max() == g.min() for g in groups])),
              reward_std_mean=float(std[counts > 0].mean()),
              **{f"mean_reward_{p}": float(np.mean([top(g, p) for g in groups])) for p in TOP_PERCENTS})


def compute_advantages(sample_ids, rewards, valid=None, cfg: AdvantageConfig = AdvantageConfig()) -> EpochAdvantages:
  """Advantages of one epoch's rollouts: `sample_ids` (n,) group keys, `rewards` (n,), `valid` (n,) bool."""
  ids = np.asarray(sample_ids)
  rewards = np.asarray(rewards, np.float64)
  valid = np.ones(rewards.shape, bool) if valid is None else np.asarray(valid, bool)
  if ids.ndim != 1 or rewards.shape != ids.shape or valid.shape != ids.shape:
    raise ValueError(f"sample_ids {ids.shape}, rewards {rewards.shape} and valid {valid.shape} must all be (n,)")
  valid = valid & np.isfinite(rewards)
  clean = np.where(valid, rewards, 0.0)

  groups, inverse = np.unique(ids, return_inverse=True)
  count, total, mean, std = _group_stats(inverse, clean, valid, len(groups))
  comparable = count >= 2
  filtered = comparable & _dropped(mean, std, cfg)
  keep_group = comparable & ~filtered

  if cfg.rloo:
    baseline = (total[inverse] - clean) / np.maximum(count[inverse] - 1, 1)
  else:
    baseline = mean[inverse]
  if cfg.std == "global":
    scale = (clean[valid].std() if valid.any() else 0.0) + cfg.eps
  else:
    scale = std[inverse] + cfg.eps
  kept = np.flatnonzero(valid & keep_group[inverse])
  advantages = ((clean - baseline) / scale)[kept].astype(np.float32)
  banned = comparable & _saturated(mean, std, cfg) & (cfg.filter != "none")
  to_ban = groups[banned] if cfg.ban_filtered else groups[:0]

  r = rewards[valid]
  stats = dict(
      rollouts=len(ids), invalid_rewards=int((~valid).sum()), groups=len(groups),
      groups_filtered=int(filtered.sum()), groups_all_invalid=int((count == 0).sum()),
      groups_too_small=int((count == 1).sum()), kept=len(kept), kept_fraction=len(kept) / max(len(ids), 1),
      banned=len(to_ban),
      # NaN only when no reward of the epoch is valid (nothing is trained then: `kept` is empty)
      reward_mean=float(r.mean()) if r.size else float("nan"), reward_std=float(r.std()) if r.size else float("nan"),
      reward_min=float(r.min()) if r.size else float("nan"), reward_max=float(r.max()) if r.size else float("nan"),
      **_group_diagnostics(inverse, clean, valid, std))
  return EpochAdvantages(kept.astype(np.int64), advantages, to_ban, stats)
