"""Training-time evaluation: one rollout per test record with the given parameters (the EMA weights),
scored by the run's reward, with the same noise at every evaluation (docs/METHOD.md section 12 says
which settings the public run uses); optionally a benchmark's protocol on a held-out set as well."""

import numpy as np
from PIL import Image

from editr1_jax import metrics, paths, rollouts, streams
from editr1_jax.data import builder as data_builder


# Programmatic accuracies of held-out edits, from pixels only (`config.eval_accuracy`): name -> module with
# `targets_for(records, folder)` and `edit_correct(source, edit, target)`.
ACCURACIES = {"world": "editr1_jax.demo.world"}


def evaluate(family, sampler, states, split: data_builder.Split, reward, config, *, chunk: int,
             desc: str | None = None, keep: dict | None = None) -> dict:
  """eval/* metrics over the first `config.eval_samples` test records (-1: all of them); with
  `config.eval_accuracy`, also the fraction of edits a programmatic check of their pixels calls correct
  (eval/accuracy, and per category). `keep`: filled with the sources, edits and targets (uint8), for image grids."""
  n = len(split) if config.eval_samples == -1 else min(config.eval_samples, len(split))
  records = data_builder.read(split, range(n))
  result = rollouts.collect(
      family, sampler, states, records, streams.row_keys(config.seed, "eval", 0, n),
      resolution=config.data.resolution, num_steps=config.rollout.eval_steps, solver=config.rollout.eval_sampler,
      guidance=config.rollout.eval_guidance, chunk=chunk, desc=desc)
  scores, valid = rollouts.score(reward, result, records)
  out = {"eval/reward_mean": float(np.mean(scores[valid])) if valid.any() else float("nan"),
         "eval/invalid": int((~valid).sum()), "eval/samples": n}
  finite = np.isfinite(result.edits).reshape(n, -1).all(axis=1)
  edits = metrics.to_uint8(np.where(finite[:, None, None, None], result.edits, -1.0))
  sources = metrics.to_uint8(result.sources)
  targets = None
  if config.eval_accuracy:
    import importlib
    check = importlib.import_module(ACCURACIES[config.eval_accuracy])
    targets = np.stack(check.targets_for([{"image": r["image_path"]} for r in records], config.data.dataset_dir))
    correct = np.array([ok and check.edit_correct(s, e, t) for ok, s, e, t in zip(finite, sources, edits, targets)])
    out["eval/accuracy"] = float(correct.mean())
    for category in sorted({r["category"] for r in records}):
      rows = np.array([r["category"] == category for r in records])
      out[f"eval/accuracy_{category}"] = float(correct[rows].mean())
  if keep is not None:
    keep.update(sources=sources, edits=edits, targets=targets)
  return out


class BenchmarkEval:
  """A benchmark protocol (GEdit-Bench / ImgEdit, `config.eval_benchmark`) on a held-out release folder, run at
  every evaluation beside the reward: the EMA policy edits each item at the training resolution (the same noise
  every time), an open judge (`config.eval_judge_dir`, loaded at the first evaluation and kept) answers the
  benchmark's prompts, and the benchmark's own overall scores become eval/<benchmark>/<subset>/<metric>.
  Edits, answers and summary of evaluation after epoch E are kept in `<workdir>/eval/<benchmark>/<E>/` (an
  evaluation re-run there samples and judges only what is missing). The judge is loaded for each evaluation
  and dropped after it: it never stays beside the policy and the reward model for the whole run."""

  def __init__(self, config, workdir: str, mesh=None, rules=None):
    from editr1_jax.bench import run
    self.config, self.run, self.mesh, self.rules = config, run, mesh, rules
    try:
      self.task = run.make_task(config.eval_benchmark, config.eval_benchmark_dir,
                                config.eval_benchmark_prompts or None, config.eval_benchmark_items or None)
    except run.BenchError as e:  # the message names the file (the dir's, eval_benchmark_items' or _prompts')
      raise ValueError(f"config.eval_benchmark ({config.eval_benchmark}): {e}") from e
    self._check_judge_pixels()
    self.folder = paths.join(workdir, "eval", config.eval_benchmark)

  def _check_judge_pixels(self) -> None:
    """The judge's pixel bounds, one set here and one the folder's, checked now rather than at the first evaluation."""
    from editr1_jax.reward import processor
    config = self.config
    if not (config.eval_judge_min_pixels or config.eval_judge_max_pixels):
      return
    folder = processor.ImageProcessorConfig.from_folder(config.eval_judge_dir)
    try:
      folder.with_pixels(config.eval_judge_min_pixels or None, config.eval_judge_max_pixels or None)
    except processor.ProcessorError as e:
      raise ValueError(f"config.eval_judge_min_pixels / eval_judge_max_pixels: {e} (set, or {config.eval_judge_dir}'s "
                       "preprocessor_config.json)") from None

  def __call__(self, family, sampler, states, epoch: int, *, chunk: int, desc: str | None = None) -> dict:
    config, run = self.config, self.run
    out = paths.join(self.folder, f"{epoch:05d}")
    edits_dir = paths.join(out, run.EDITS)
    have = run.file_check(edits_dir)
    missing = [i for i, item in enumerate(self.task.items) if not have(run.edit_path(edits_dir, item))]
    if missing:
      keys = streams.row_keys(config.seed, "eval", 1, len(self.task.items))[np.asarray(missing)]
      records = [{"id": i, "image": self.task.edit_source(self.task.items[i]),
                  "prompt": self.task.items[i].instruction} for i in missing]
      result = rollouts.collect(
          family, sampler, states, records, keys, resolution=config.data.resolution,
          num_steps=config.rollout.eval_steps, solver=config.rollout.eval_sampler,
          guidance=config.rollout.eval_guidance, chunk=chunk, desc=desc)
      for i, pixels in zip(missing, metrics.to_uint8(np.nan_to_num(result.edits, nan=-1.0))):
        run.save_edit(Image.fromarray(pixels), run.edit_path(edits_dir, self.task.items[i]))
    from editr1_jax.bench.judge import QwenJudge
    judge = QwenJudge(config.eval_judge_dir, max_new_tokens=config.eval_judge_max_new_tokens,
                      batch_size=config.reward.batch_size, dtype=config.reward.dtype, mesh=self.mesh, rules=self.rules,
                      attention_impl=config.model.attention_impl, min_pixels=config.eval_judge_min_pixels or None,
                      max_pixels=config.eval_judge_max_pixels or None)
    results = run.judge_items(self.task, judge, edits_dir, paths.join(out, run.RESULTS),
                              batch_size=config.reward.batch_size)
    settings = {"judge": {**judge.settings, "folder": paths.absolute(config.eval_judge_dir)},
                "editor": {"epoch": epoch, "weights": "ema", "steps": config.rollout.eval_steps,
                           "guidance": config.rollout.eval_guidance, "sampler": config.rollout.eval_sampler,
                           "seed": config.seed, "resolution": config.data.resolution}}
    del judge
    report = run.write_summary(self.task, results.values(), out, settings=settings)
    scores = {}
    for subset, summary in report["summaries"].items():
      prefix = f"eval/{config.eval_benchmark}/{subset}"
      scores.update({f"{prefix}/{m}": float("nan") if v is None else v for m, v in summary["overall"].items()})
      scores[f"{prefix}/unparseable"] = summary["n_unparseable"]
    return scores
