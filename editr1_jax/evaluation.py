"""Training-time evaluation: one rollout per test record with the given parameters (the EMA weights),
scored by the run's reward, with the same noise at every evaluation (docs/METHOD.md section 12 says
which settings the public run uses)."""

import numpy as np

from editr1_jax import rollouts, streams
from editr1_jax.data import builder as data_builder


def evaluate(family, sampler, states, split: data_builder.Split, reward, config, *, chunk: int,
             desc: str | None = None) -> dict:
  """eval/* metrics over the first `config.eval_samples` test records (-1: all of them)."""
  n = len(split) if config.eval_samples == -1 else min(config.eval_samples, len(split))
  records = data_builder.read(split, range(n))
  result = rollouts.collect(
      family, sampler, states, records, streams.row_keys(config.seed, "eval", 0, n),
      resolution=config.data.resolution, num_steps=config.rollout.eval_steps, solver=config.rollout.eval_sampler,
      guidance=config.rollout.eval_guidance, chunk=chunk, desc=desc)
  scores, valid = rollouts.score(reward, result, records)
  return {"eval/reward_mean": float(np.mean(scores[valid])) if valid.any() else float("nan"),
          "eval/invalid": int((~valid).sum()), "eval/samples": n}
