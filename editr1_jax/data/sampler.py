"""Grouped epochs: G distinct records, each repeated k times (one group per record id).

G is a property of the run, never of the device or host count. The draw is a pure function of
(seed, epoch, banned ids), so the sampler's checkpoint state is just the banned set: resuming at
epoch e reproduces exactly the rollouts an uninterrupted run would have made.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass
class GroupedSampler:
  num_records: int
  groups_per_epoch: int  # G
  group_size: int  # k
  seed: int
  banned: set[int] = dataclasses.field(default_factory=set)

  def __post_init__(self):
    for name in ("num_records", "groups_per_epoch", "group_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"GroupedSampler.{name} must be positive, got {getattr(self, name)}")

  def epoch_records(self, epoch: int) -> np.ndarray:
    """The G record ids of an epoch, in group order."""
    candidates = np.setdiff1d(np.arange(self.num_records), np.fromiter(self.banned, np.int64, len(self.banned)))
    if len(candidates) < self.groups_per_epoch:
      raise ValueError(f"epoch {epoch}: {len(candidates)} records left after banning {len(self.banned)}, "
                       f"fewer than groups_per_epoch={self.groups_per_epoch}")
    rng = np.random.default_rng([self.seed, epoch])
    return rng.choice(candidates, self.groups_per_epoch, replace=False)

  def rollouts(self, epoch: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """This host's contiguous share of the epoch's G*k rollouts (record ids, groups contiguous)."""
    total = self.groups_per_epoch * self.group_size
    if total % process_count:
      raise ValueError(f"groups_per_epoch * group_size = {total} rollouts do not divide over {process_count} hosts")
    share = total // process_count
    return np.repeat(self.epoch_records(epoch), self.group_size)[process_index * share:(process_index + 1) * share]

  def ban(self, record_ids) -> None:
    self.banned.update(int(i) for i in record_ids)

  def state(self) -> dict:
    return {"banned": np.array(sorted(self.banned), np.int64)}

  def restore(self, state: dict) -> None:
    self.banned = {int(i) for i in np.asarray(state["banned"]).ravel()}
