"""The Edit-R1 training program: one epoch is rollouts -> decode -> reward -> advantages/filtering ->
NFT training -> old-policy update (+ EMA inside the optimizer step), in that order (docs/METHOD.md section 2).

Every process computes the same epoch plan (record ids, noise keys) from (seed, epoch), so host
inputs are identical everywhere and enter the jitted, mesh-sharded steps as global arrays; what a
host needs back (decoded images, rewards) is gathered. Everything that makes a run continue
exactly lives in the checkpoint: train state (adapters, old policy, EMA, optimizer), sampler ban
set, epoch and counters.
"""

import io
import logging
import time

import jax
import ml_collections
import numpy as np
from PIL import Image
from tqdm import tqdm

from editr1_jax import advantages as adv
from editr1_jax import images as imageio
from editr1_jax import evaluation, families, metrics, nft, paths, pod, preemption, rollouts, run_config, streams
from editr1_jax import reward as rewards
from editr1_jax import sharding as shd
from editr1_jax.checkpoint import CheckpointDamaged, Checkpointer
from editr1_jax.data import builder as data_builder
from editr1_jax.data import fingerprint
from editr1_jax.data.sampler import GroupedSampler

_LOG = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  pass


class RewardError(RuntimeError):
  """The reward gave no valid score for `config.max_invalid_reward_epochs` epochs in a row."""


class ResumeError(ValueError):
  """The workdir's checkpoint cannot continue with this config or this data; the message lists why."""


def nft_config(config) -> nft.NFTConfig:
  return nft.NFTConfig(
      beta=config.nft.beta, kl_weight=config.nft.kl_weight, adv_clip=config.advantage.clip,
      adv_mode=config.advantage.mode, timestep_fraction=config.nft.timestep_fraction,
      learning_rate=config.optim.learning_rate, adam_b1=config.optim.b1, adam_b2=config.optim.b2,
      weight_decay=config.optim.weight_decay, adam_eps=config.optim.eps, max_grad_norm=config.optim.grad_clip,
      decay_schedule=config.nft.old_policy_schedule, ema_max_decay=config.nft.ema_max_decay)


def advantage_config(config) -> adv.AdvantageConfig:
  return adv.AdvantageConfig(std=config.advantage.std, rloo=config.advantage.rloo, filter=config.filter.semantics,
                             tau_mu=config.filter.tau_mu, tau_sigma=config.filter.tau_sigma,
                             ban_filtered=config.data.ban_filtered)


def mesh_rules(config) -> tuple:
  """The config's sharding rules as the hashable tuple the jitted steps take."""
  return tuple(tuple(r) for r in config.mesh.rules)


def build_nft_trainer(config, family, transformer, mesh=None, rules=shd.DEFAULT_RULES):
  """(NFTTrainer, trainable params in `config.model.adapter_dtype`, frozen params) of a family's (class or
  instance) policy network `transformer`."""
  policy, params, frozen = nft.Policy.from_model(transformer, family.velocity, family.condition_axes(),
                                                 config.optim.full_finetune)
  params = jax.tree.map(lambda x: x.astype(config.model.adapter_dtype), params)
  trainer = nft.NFTTrainer(policy, nft_config(config), jax.eval_shape(lambda: params), jax.eval_shape(lambda: frozen),
                           mesh=mesh, rules=rules)
  return trainer, params, frozen


# ----------------------------------------------------------------------------------------------------
# The epoch as functions: each takes what it needs and returns what the next step needs.
def train_epoch(trainer: nft.NFTTrainer, state: nft.TrainState, frozen, result: rollouts.Rollouts,
                advantages: adv.EpochAdvantages, *, micro_batch: int, key: jax.Array, rng: np.random.Generator,
                desc: str | None = None):
  """NFT accumulate over the kept rollouts' micro-batches, one optimizer step, the old-policy update ->
  (state, per-micro-batch device metrics, apply metrics, old-policy metrics). Nothing is read back here:
  the host never waits on the device between micro-batches."""
  indices, advs, mask = advantages.micro_batches(micro_batch, rng)
  axes = trainer.policy.cond_axes
  launched = []
  for m in tqdm(range(len(indices)), desc=desc, disable=desc is None, leave=False):
    try:
      preemption.check("before an NFT micro-batch")
    except preemption.Preempted as stop:
      stop.state = state  # the one live state: the caller's was donated to the first micro-batch
      raise
    batch = nft.gather_batch(result.x0, result.cond, axes, result.sigmas, indices[m], advs[m], mask[m])
    state, step_metrics = trainer.accumulate(state, frozen, trainer.place(batch, "batch"), key)
    launched.append(step_metrics)
  state, applied = trainer.apply(state)
  state, old = trainer.update_old(state)
  return state, launched, applied, old


def epoch_train_metrics(per_batch: list[dict], applied: dict, old: dict, learning_rate: float) -> dict:
  """The epoch's train/* metrics from the device metrics of `train_epoch`, read back once."""
  per_batch, applied, old = jax.device_get((per_batch, applied, old))
  terms = sum(float(b["terms"]) for b in per_batch)
  mean = lambda k: sum(float(b[k]) * float(b["terms"]) for b in per_batch) / terms if terms else 0.0
  divergence = sum(float(b["old_deviate_sum"]) for b in per_batch) / terms if terms else 0.0
  divergence_sq = sum(float(b["old_deviate_sq_sum"]) for b in per_batch) / terms if terms else 0.0
  return {"train/policy": mean("policy"), "train/kl": mean("kl"), "train/loss": mean("loss"),
          "train/x0_norm": sum(float(b["x0_norm"]) for b in per_batch) / max(len(per_batch), 1),
          "train/terms": terms, "train/micro_batches": len(per_batch), "train/grad_norm": float(applied["grad_norm"]),
          "train/applied": float(applied["applied"]), "train/finite": float(applied["finite"]),
          "train/step": int(applied["step"]),
          "train/learning_rate": learning_rate, "train/ema_decay": float(applied["ema_decay"]),
          "train/old_decay": float(old["old_decay"]),
          # the public code's old-policy divergence: mean((v - v_old)^2) of a term, mean and std over the terms
          "train/old_divergence": divergence,
          "train/old_divergence_std": float(np.sqrt(max(divergence_sq - divergence ** 2, 0.0)))}


class Trainer:
  """Owns the models, data, train state and checkpoints of one run in `workdir`."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    run_config.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    try:
      paths.check_output(workdir, "--workdir")
    except paths.PathError as e:
      raise run_config.ConfigError(str(e)) from None
    workdir = paths.absolute(workdir)
    self.config, self.workdir = config, workdir
    pod.enable_compile_cache(pod.compile_cache_dir(config, workdir))
    self.is_main = jax.process_index() == 0
    self.rules = mesh_rules(config)
    self.mesh = shd.make_mesh(tuple(config.mesh.shape))

    # Everything that can refuse the run is checked before a model is loaded: the checkpoint to resume from
    # (damaged ones set aside), the config it was saved with, the data it was trained on.
    self.checkpoints = Checkpointer(paths.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
    resume = self._resume_point()
    tfds_dir = config.data.tfds_dir or paths.join(workdir, "tfds")
    if jax.process_count() > 1:  # each process writes its own copy: no race, no shared filesystem assumed
      tfds_dir = paths.join(tfds_dir, f"process_{jax.process_index()}")
    self.data_fingerprint = data_builder.fingerprint(config.data.dataset_dir, tfds_dir,
                                                     allow_outside=config.data.allow_outside_paths)
    pod.check_same_program(run_config.as_json(config), self.data_fingerprint.digest)
    if resume is not None:
      self._check_data(resume[1])
    built = data_builder.prepare(config.data.dataset_dir, tfds_dir, self.data_fingerprint,
                                 allow_outside=config.data.allow_outside_paths)
    self.train_split = data_builder.Split(built, "train")
    self.test_split = data_builder.Split(built, "test")
    self.sampler = GroupedSampler(len(self.train_split), config.data.groups_per_epoch, config.data.group_size,
                                  config.seed)
    self.benchmark = (evaluation.BenchmarkEval(config, workdir, self.mesh, self.rules) if config.eval_benchmark
                      else None)

    self.family = families.build(config, self.mesh, self.rules)
    self.chunk = self.family.chunk  # rows per sampling / encoding call: rollout.batch_size x (data x fsdp)
    self.reward = rewards.build(config, self.mesh, self.rules)
    self.nft, params, self.frozen = build_nft_trainer(config, self.family, self.family.transformer, self.mesh,
                                                      self.rules)
    self.policy = self.nft.policy
    self.frozen = self.nft.place(self.frozen, "frozen")
    self.state = self.nft.init(self.nft.place(params, "params"))
    self.rollout_sampler = rollouts.Sampler(self.family, lambda states: self.policy.model(*states),
                                            noise_level=config.rollout.sde_noise)

    self.writer = metrics.MetricsWriter(paths.join(workdir, "tensorboard"), enabled=self.is_main,
                                        image_dir=paths.join(workdir, "images"))
    self.epoch = 0
    self.saved_epoch: int | None = None  # the epoch of the newest checkpoint of this run
    self._epoch_start = None  # (epoch, sampler state, streaks) while an epoch runs: what a stop inside it restores
    self.nonfinite_streak = 0
    self.invalid_streak = 0
    if resume is not None:
      self._restore(*resume)

  # ------------------------------------------------------------------------------------------------
  def run_epoch(self) -> dict:
    """One epoch (docs/METHOD.md section 2), top to bottom."""
    config, epoch = self.config, self.epoch
    record_ids = self.sampler.rollouts(epoch)  # the global plan, the same on every process
    records = data_builder.read(self.train_split, record_ids)
    timing = {}

    t0 = time.perf_counter()
    result = rollouts.collect(
        self.family, self.rollout_sampler, (self.state.old_params, self.frozen), records,
        streams.row_keys(config.seed, "rollout", epoch, len(records)), resolution=config.data.resolution,
        num_steps=config.rollout.num_steps, solver=config.rollout.sampler, guidance=config.rollout.guidance,
        chunk=self.chunk, desc=f"epoch {epoch} rollouts" if self.is_main else None)
    jax.block_until_ready(result.x0)
    timing["rollout_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores, valid = rollouts.score(self.reward, result, records,
                                   progress=f"epoch {epoch} reward" if self.is_main else None)
    timing["reward_s"] = time.perf_counter() - t0
    self.invalid_streak = 0 if valid.any() else self.invalid_streak + 1
    if not valid.any():
      _LOG.warning("epoch %d: the reward gave no valid score (%d epochs in a row): nothing is learned", epoch,
                   self.invalid_streak)

    advantages = adv.compute_advantages(record_ids, scores, valid, advantage_config(config))
    self.sampler.ban(advantages.to_ban)

    t0 = time.perf_counter()
    key_data = np.asarray(jax.random.key_data(streams.key(config.seed, "train", epoch)))  # host: same on every process
    key = jax.random.wrap_key_data(jax.device_put(key_data, self.nft.shardings["key"]))
    try:
      self.state, launched, applied, old = train_epoch(
          self.nft, self.state, self.frozen, result, advantages,
          micro_batch=config.nft.micro_batch * shd.batch_width(self.mesh),
          key=key, rng=streams.numpy_rng(config.seed, "micro_batches", epoch),
          desc=f"epoch {epoch} train" if self.is_main else None)
    except preemption.Preempted as stop:
      self.state = getattr(stop, "state", self.state)
      raise
    train_metrics = epoch_train_metrics(launched, applied, old, config.optim.learning_rate)
    timing["train_s"] = time.perf_counter() - t0
    if train_metrics["train/finite"]:
      self.nonfinite_streak = 0
    else:
      self.nonfinite_streak += 1
      _LOG.warning("epoch %d: non-finite gradient or parameters; update refused (%d in a row)", epoch,
                   self.nonfinite_streak)

    self.epoch += 1
    s = advantages.stats
    out = {"reward/mean": s["reward_mean"], "reward/std": s["reward_std"], "reward/min": s["reward_min"],
           "reward/max": s["reward_max"], "reward/invalid": s["invalid_rewards"],
           "filter/kept_fraction": s["kept_fraction"], "filter/groups_filtered": s["groups_filtered"],
           "filter/banned_total": len(self.sampler.banned), "data/prompt_cache_misses": self.family.cache_misses,
           "filter/zero_std_fraction": s["zero_std_ratio"], "reward/group_std_mean": s["reward_std_mean"],
           **{f"reward/top{p}_mean": s[f"mean_reward_{p}"] for p in adv.TOP_PERCENTS},
           **train_metrics, **{f"time/{k}": v for k, v in timing.items()},
           "time/rollouts_per_s": len(records) / max(timing["rollout_s"], 1e-9)}
    if self.is_main and config.log_images_every and epoch % config.log_images_every == 0:
      g = min(4, config.data.groups_per_epoch) * config.data.group_size
      self.writer.image(self.epoch, "rollouts", metrics.group_grid(result.sources[:g], result.edits[:g], scores[:g],
                                                                    config.data.group_size))
    self._stop_if_stuck()
    return out

  def _stop_if_stuck(self) -> None:
    """Stops a run that learns nothing (refused updates, or no valid reward) epoch after epoch; saves first."""
    config = self.config
    if self.nonfinite_streak >= config.max_nonfinite_updates:
      self.save()
      raise NonFiniteError(f"{self.nonfinite_streak} consecutive non-finite updates (config.max_nonfinite_updates "
                           f"= {config.max_nonfinite_updates}); stopping at epoch {self.epoch} (saved)")
    if self.invalid_streak >= config.max_invalid_reward_epochs:
      self.save()
      raise RewardError(f"{self.invalid_streak} consecutive epochs without one valid reward (config."
                        f"max_invalid_reward_epochs = {config.max_invalid_reward_epochs}); stopping at epoch "
                        f"{self.epoch} (saved). Check the judge: python launch/score.py --model=... on one edit.")

  def evaluate(self) -> dict:
    """The EMA parameters on the test split (docs/METHOD.md section 2, step 7), and on the benchmark if any."""
    states, desc = (self.state.ema_params, self.frozen), "eval" if self.is_main else None
    images: dict = {}
    out = evaluation.evaluate(self.family, self.rollout_sampler, states, self.test_split, self.reward, self.config,
                              chunk=self.chunk, desc=desc, keep=images)
    self._eval_images(images)
    if self.benchmark is not None:
      out.update(self.benchmark(self.family, self.rollout_sampler, states, self.epoch, chunk=self.chunk, desc=desc))
    return out

  def _eval_images(self, images: dict) -> None:
    """The evaluation's first edits as a grid (the same sources and noise every time: `images/eval_<epoch>.png`);
    the starting weights' edits are kept (`images/eval_edits_00000.npy`) so that every later evaluation also
    writes `images/before_after.png`: source, before training, now (and the target where there is one)."""
    if not (self.is_main and self.config.log_images_every):
      return
    columns = {"source": images["sources"], f"epoch {self.epoch}": images["edits"]}
    if images["targets"] is not None:
      columns["target"] = images["targets"]
    self.writer.image(self.epoch, "eval", metrics.columns_grid(columns))
    first = paths.join(self.workdir, "images", "eval_edits_00000.npy")
    if self.epoch == 0:
      buffer = io.BytesIO()
      np.save(buffer, images["edits"])
      paths.write_bytes(first, buffer.getvalue())
    elif paths.isfile(first):
      before = np.load(io.BytesIO(paths.read_bytes(first)))
      if before.shape == images["edits"].shape:
        columns = {"source": images["sources"], "epoch 0": before, f"epoch {self.epoch}": images["edits"],
                   **({"target": images["targets"]} if images["targets"] is not None else {})}
        imageio.save(Image.fromarray(metrics.columns_grid(columns)),
                     paths.join(self.workdir, "images", "before_after.png"))

  # ------------------------------------------------------------------------------------------------
  def _sync(self, name: str) -> None:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(name)

  def _resume_point(self) -> tuple[int, dict] | None:
    """(epoch, meta) of the newest intact checkpoint, or None for a new run. Damaged checkpoints are renamed
    (never deleted) with a warning; a config that changes what the saved state means is refused."""
    intact, damaged = self.checkpoints.intact_epochs(newest_only=True)
    self._sync("checkpoints verified")  # every process decided before one renames
    for epoch in damaged:
      message = f"{damaged[epoch]}; it is set aside"
      if self.is_main:
        message += f" as {self.checkpoints.set_aside(epoch)}"
      _LOG.warning(message)
      if self.is_main:
        tqdm.write(f"warning: {message}")
    self._sync("damaged checkpoints set aside")
    self.checkpoints.all_epochs()  # every process re-reads the folder: a stale list would skip later saves
    if not intact:
      if damaged:
        _LOG.warning("no intact checkpoint left in %s: starting a new run", self.checkpoints.directory)
      return None
    epoch = intact[0]
    meta = self.checkpoints.restore_meta(epoch)
    differences = run_config.resume_differences(meta.get("config", {}), self.config)
    if differences:
      raise ResumeError(f"{self.checkpoints.path(epoch)} was saved with another config; resuming would change "
                        "what its state means:\n  " + "\n  ".join(differences) +
                        "\nUse the saved values, another --workdir, or name the fields in --config.resume_accept.")
    return epoch, meta

  def _check_data(self, meta: dict) -> None:
    try:
      saved = fingerprint.Fingerprint.from_json(meta["data"])
      if saved.digest == self.data_fingerprint.digest:
        return
      changes = "\n  ".join(fingerprint.differences(saved, self.data_fingerprint))
    except (KeyError, TypeError, AttributeError):  # saved by an older version, or a damaged fingerprint
      changes = "the checkpoint records no (readable) fingerprint of its data: it cannot be compared"
    if not self.config.data.accept_changed_data:
      raise ResumeError(f"config.data.dataset_dir = {self.config.data.dataset_dir!r}: the dataset changed since the "
                        f"checkpoint was saved:\n  {changes}\nRestore it, use another --workdir, or resume on the "
                        "new data with --config.data.accept_changed_data=True.")
    _LOG.warning("resuming on changed data (config.data.accept_changed_data):\n  %s", changes)

  def _restore(self, epoch: int, meta: dict) -> None:
    try:
      state, _ = self.checkpoints.restore(epoch, {"train": self.state})
    except Exception as e:  # a checkpoint without a manifest can only be checked by reading it
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointDamaged(f"checkpoint {self.checkpoints.path(epoch)} cannot be restored: {first}") from None
    self.state = state["train"]
    self.sampler.restore({"banned": np.asarray(meta["banned"], np.int64)})
    self.epoch, self.nonfinite_streak = int(meta["epoch"]), int(meta["nonfinite_streak"])
    self.invalid_streak = int(meta.get("invalid_streak", 0))
    self.saved_epoch = self.epoch
    if self.is_main:
      print(f"resumed from {self.checkpoints.path(epoch)} at epoch {self.epoch}", flush=True)

  def save(self) -> None:
    meta = {"epoch": self.epoch, "step": int(self.state.step), "nonfinite_streak": self.nonfinite_streak,
            "invalid_streak": self.invalid_streak, "banned": [int(i) for i in self.sampler.state()["banned"]],
            "config": run_config.as_json(self.config), "data": self.data_fingerprint.to_json()}
    self.checkpoints.save(self.epoch, {"train": self.state}, meta)
    self.saved_epoch = self.epoch

  def _log(self, m: dict) -> None:
    self.writer.scalars(self.epoch, m)
    if self.is_main:
      tqdm.write(metrics.summary_line(self.epoch, self.config.num_epochs, m))

  def run(self, stop_after: int | None = None) -> bool:
    """Epochs until config.num_epochs (or `stop_after` more), with evaluation, logging and checkpoints. The state
    is saved before every evaluation, so a failing evaluation never costs training work.

    SIGTERM (a preemption notice) stops the run at the next check (`editr1_jax.preemption`): an epoch stopped
    before its optimizer step is dropped whole (its host state is put back and its partial gradient sum cleared,
    so the state is exactly the previous epoch's), the newest finished epoch is saved if it is not yet, and run
    returns False. A save in progress when the signal comes is finished first. The restarted run redoes only the
    dropped epoch, and ends as the uninterrupted run would, bit for bit."""
    with preemption.watch():
      try:
        self._run_epochs(stop_after)
      except preemption.Preempted as stop:
        self._stop(stop)
        return False
    return True

  def _run_epochs(self, stop_after: int | None) -> None:
    config = self.config
    target = config.num_epochs if stop_after is None else min(config.num_epochs, self.epoch + stop_after)
    if self.epoch == 0 and config.eval_every and config.eval_before_training:
      self._log(self.evaluate())
    while self.epoch < target:
      preemption.check("between epochs")
      self._epoch_start = (self.epoch, self.sampler.state(), self.nonfinite_streak, self.invalid_streak)
      m = self.run_epoch()
      self._epoch_start = None
      evaluating = config.eval_every and self.epoch % config.eval_every == 0
      if evaluating or self.epoch % config.checkpoint_every == 0 or self.epoch == config.num_epochs:
        self.save()
      if evaluating:
        try:
          m.update(self.evaluate())
        except preemption.Preempted:
          self._log(m)
          raise
        except Exception:
          self._log(m)
          _LOG.error("evaluation after epoch %d failed; its checkpoint is saved in %s", self.epoch,
                     self.checkpoints.path(self.epoch))
          raise
      self._log(m)
    self.writer.close()

  def _stop(self, stop: preemption.Preempted) -> None:
    """After a stop request: the state of the newest finished epoch, saved."""
    if self._epoch_start is not None:  # stopped inside an epoch, before its optimizer step
      epoch, banned, self.nonfinite_streak, self.invalid_streak = self._epoch_start
      if epoch != self.epoch:
        raise RuntimeError(f"stopped after epoch {epoch}'s optimizer step: no check may come after it")
      self.sampler.restore(banned)
      self.state = self.nft.drop_gradients(self.state)
      self._epoch_start = None
    if self.epoch > 0 and self.saved_epoch != self.epoch:
      self.save()
    self.writer.close()
    if self.is_main:
      where = self.checkpoints.path(self.epoch) if self.epoch > 0 else "nothing to save: no epoch finished"
      print(f"{stop}: stopped with {self.epoch} epoch(s) finished ({where}); run the same command to resume",
            flush=True)
