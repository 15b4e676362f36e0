"""The Edit-R1 training program: one epoch is rollouts -> decode -> reward -> advantages/filtering ->
NFT training -> old-policy update (+ EMA inside the optimizer step), in that order (docs/METHOD.md section 2).

Every process computes the same epoch plan (record ids, noise keys) from (seed, epoch), so host
inputs are identical everywhere and enter the jitted, mesh-sharded steps as global arrays; what a
host needs back (decoded images, rewards) is gathered. Everything that makes a run continue
exactly lives in the checkpoint: train state (adapters, old policy, EMA, optimizer), sampler ban
set, epoch and counters.
"""

import collections
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from editr1_jax import advantages as adv
from editr1_jax import reward as rewards
from editr1_jax import latents, metrics, nft, run_config, sampling
from editr1_jax import sharding as shd
from editr1_jax.checkpoint import CheckpointDamaged, Checkpointer
from editr1_jax.conditioning import TextEncoders
from editr1_jax.data import builder as data_builder
from editr1_jax.data import fingerprint
from editr1_jax.data.sampler import GroupedSampler
from editr1_jax.layers import LoraSpec
from editr1_jax.models import autoencoder, flux

_LOG = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  pass


class RewardError(RuntimeError):
  """The reward gave no valid score for `config.max_invalid_reward_epochs` epochs in a row."""


class ResumeError(ValueError):
  """The workdir's checkpoint cannot continue with this config or this data; the message lists why."""


def lora_spec(config) -> LoraSpec | None:
  if config.optim.full_finetune:
    return None
  return LoraSpec(rank=config.lora.rank, alpha=float(config.lora.alpha), targets=tuple(config.lora.targets))


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


def build_transformer(config, mesh, rules) -> flux.FluxTransformer:
  """The policy network: tiny random (demo) or read from the pipeline folder, placed on the mesh."""
  lora = lora_spec(config)
  if config.model.tiny:
    from editr1_jax import tiny
    return tiny.tiny_transformer(config.seed, lora, mesh=mesh, rules=rules, dtype=config.model.dtype,
                                 param_dtype=config.model.param_dtype, remat=config.model.remat,
                                 attention_impl=config.model.attention_impl)
  return flux.load_flux_transformer(
      config.model.pipeline_dir, dtype=config.model.dtype, param_dtype=config.model.param_dtype, lora=lora,
      lora_weights=config.model.init_lora or None, remat=config.model.remat,
      attention_impl=config.model.attention_impl, mesh=mesh, rules=rules, seed=config.seed)


def build_conditioning(config, mesh, rules):
  """(VAE, text encoders) of the pipeline, or their tiny random stand-ins."""
  if config.model.tiny:
    from editr1_jax import tiny
    return (tiny.tiny_vae(config.seed, mesh=mesh, rules=rules),
            tiny.tiny_text_encoders(config.seed, config.data.t5_max_length, mesh=mesh, rules=rules))
  folder = config.model.pipeline_dir
  vae = autoencoder.load_autoencoder(folder, dtype=config.model.dtype, mesh=mesh, rules=rules)
  text = TextEncoders.from_pipeline(folder, dtype=config.model.dtype, max_sequence_length=config.data.t5_max_length,
                                    mesh=mesh, rules=rules)
  return vae, text


def mesh_rules(config) -> tuple:
  """The config's sharding rules as the hashable tuple the jitted steps take."""
  return tuple(tuple(r) for r in config.mesh.rules)


def build_nft_trainer(config, transformer: flux.FluxTransformer, mesh=None, rules=shd.DEFAULT_RULES):
  """(NFTTrainer, trainable params in `config.model.adapter_dtype`, frozen params) of the policy network."""
  policy, params, frozen = nft.Policy.from_model(transformer, config.optim.full_finetune)
  params = jax.tree.map(lambda x: x.astype(config.model.adapter_dtype), params)
  trainer = nft.NFTTrainer(policy, nft_config(config), jax.eval_shape(lambda: params), jax.eval_shape(lambda: frozen),
                           mesh=mesh, rules=rules)
  return trainer, params, frozen


class PromptCache:
  """Instruction -> (T5 hidden states, CLIP pooled), computed once per instruction (LRU-bounded).

  Missing instructions are encoded in chunks of a fixed size (the last one padded), so the encoders
  compile once and an instruction's embedding does not depend on which others were encoded with it
  (a resumed run computes exactly what the uninterrupted one did).
  """

  def __init__(self, encoders: TextEncoders, max_entries: int, chunk: int):
    self._encoders, self._max, self._chunk = encoders, max_entries, chunk
    self._entries: collections.OrderedDict = collections.OrderedDict()
    self.misses = 0

  def __call__(self, prompts) -> tuple[np.ndarray, np.ndarray]:
    missing = [p for p in dict.fromkeys(prompts) if p not in self._entries]
    self.misses += len(missing)
    for s in range(0, len(missing), self._chunk):
      part = missing[s:s + self._chunk]
      hidden, pooled, _ = self._encoders(part + [part[0]] * (self._chunk - len(part)))
      hidden, pooled = shd.to_host(hidden), shd.to_host(pooled)
      for i, p in enumerate(part):
        self._entries[p] = (hidden[i], pooled[i])
    for p in prompts:
      self._entries.move_to_end(p)
    out = [self._entries[p] for p in prompts]
    while len(self._entries) > self._max:
      self._entries.popitem(last=False)
    return np.stack([h for h, _ in out]), np.stack([q for _, q in out])


class Trainer:
  """Owns the models, data, train state and checkpoints of one run in `workdir`."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    run_config.validate(config, num_devices=jax.device_count(), num_processes=jax.process_count())
    self.config, self.workdir = config, workdir
    self.is_main = jax.process_index() == 0
    self.rules = mesh_rules(config)
    self.mesh = shd.make_mesh(tuple(config.mesh.shape))
    self.rows_multiple = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    self.chunk = config.rollout.batch_size * self.rows_multiple  # rows per sampling / encoding call

    # Everything that can refuse the run is checked before a model is loaded: the checkpoint to resume from
    # (damaged ones set aside), the config it was saved with, the data it was trained on.
    self.checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
    resume = self._resume_point()
    tfds_dir = config.data.tfds_dir or os.path.join(workdir, "tfds")
    if jax.process_count() > 1:  # each process writes its own copy: no race, no shared filesystem assumed
      tfds_dir = os.path.join(tfds_dir, f"process_{jax.process_index()}")
    self.data_fingerprint = data_builder.fingerprint(config.data.dataset_dir, tfds_dir,
                                                     allow_outside=config.data.allow_outside_paths)
    if resume is not None:
      self._check_data(resume[1])
    built = data_builder.prepare(config.data.dataset_dir, tfds_dir, self.data_fingerprint,
                                 allow_outside=config.data.allow_outside_paths)
    self.train_split = data_builder.Split(built, "train")
    self.test_split = data_builder.Split(built, "test")
    self.sampler = GroupedSampler(len(self.train_split), config.data.groups_per_epoch, config.data.group_size,
                                  config.seed)

    transformer = build_transformer(config, self.mesh, self.rules)
    self.vae, text = build_conditioning(config, self.mesh, self.rules)
    self.prompts = PromptCache(text, config.data.prompt_cache_entries, self.chunk)
    self.reward = rewards.build(config, self.mesh, self.rules)
    self.nft, params, self.frozen = build_nft_trainer(config, transformer, self.mesh, self.rules)
    self.policy = self.nft.policy
    self.frozen = self.nft.place(self.frozen, "frozen")
    self.state = self.nft.init(self.nft.place(params, "params"))
    self.guidance = config.rollout.guidance

    factor = self.vae.cfg.downsample_factor
    self.latent_side = config.data.resolution // factor
    if self.latent_side % 2:
      raise run_config.ConfigError(f"config.data.resolution = {config.data.resolution}: the latent side "
                                   f"{self.latent_side} (resolution / {factor}) must be even to pack 2x2 patches")
    self.grid = self.latent_side // 2
    self.img_ids = np.concatenate([latents.target_ids(self.grid, self.grid), latents.reference_ids(self.grid, self.grid)])
    self.token_channels = 4 * self.vae.cfg.latent_channels

    self._encode = jax.jit(lambda vae, x: latents.reference_latents(vae, x)[0])
    self._decode = jax.jit(lambda vae, t: latents.decode_tokens(vae, t, self.latent_side, self.latent_side))
    self._rollout = jax.jit(self._rollout_fn, static_argnames=("solver",))

    self.writer = metrics.MetricsWriter(os.path.join(workdir, "tensorboard"), enabled=self.is_main,
                                        image_dir=os.path.join(workdir, "images"))
    self.epoch = 0
    self.nonfinite_streak = 0
    self.invalid_streak = 0
    if resume is not None:
      self._restore(*resume)

  # ------------------------------------------------------------------------------------------------
  def _rows(self, x):
    """Host rows (identical on every process) -> a global array split over data x fsdp."""
    axes = ("batch",) + (None,) * (np.ndim(x) - 1)
    return jax.device_put(x, NamedSharding(self.mesh, shd.logical_to_spec(axes, self.rules, np.shape(x), self.mesh)))

  def _replicated(self, x):
    return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))

  def _rollout_fn(self, params, frozen, cond, noise, sigmas, keys, *, solver):
    with shd.use_mesh(self.mesh, self.rules):
      def velocity(z, sigma):
        return self.policy.velocity(params, frozen, z, jnp.broadcast_to(sigma, (z.shape[0],)), cond)
      return sampling.sample(velocity, noise, sigmas, solver=solver, keys=keys,
                             noise_level=self.config.rollout.sde_noise).x0

  def _conditions(self, records: list[dict]) -> tuple[np.ndarray, dict]:
    """Source images (n, H, W, 3) in [-1, 1] and the per-row conditioning (host arrays)."""
    res = self.config.data.resolution
    sources = np.stack([latents.training_image(r["image"], res, res) for r in records])
    hidden, pooled = self.prompts([r["prompt"] for r in records])
    return sources, dict(text=hidden, pooled=pooled)

  def _generate(self, params, records, keys_data, *, steps, sampler, guidance, desc):
    """Rollouts of `params` for the rows `records`: (x0 tokens (device), edited images (host), sources, conds)."""
    n = len(records)
    uniq = list(dict.fromkeys(r["id"] for r in records))
    by_id = {r["id"]: r for r in records}
    src_u, cond_u = self._conditions([by_id[i] for i in uniq])
    chunk = self.chunk
    refs_u = []
    for s in range(0, len(uniq), chunk):  # fixed-size calls: one compile, row results independent of the rest
      part = src_u[s:s + chunk]
      padded = np.concatenate([part, part[:1].repeat(chunk - len(part), 0)])
      refs_u.append(shd.to_host(self._encode(self.vae, self._rows(padded)))[:len(part)])
    refs_u = np.concatenate(refs_u)
    where = np.array([uniq.index(r["id"]) for r in records])
    rows = dict(reference=refs_u[where], text=cond_u["text"][where], pooled=cond_u["pooled"][where])
    sigmas = sampling.shifted_sigmas(steps, self.grid * self.grid)
    x0_parts, images = [], []
    padded_n = -(-n // chunk) * chunk
    order = np.concatenate([np.arange(n), np.zeros(padded_n - n, np.int64)])
    for s in tqdm(range(0, padded_n, chunk), desc=desc, disable=not self.is_main, leave=False):
      idx = order[s:s + chunk]
      cond = sampling.EditCondition(
          reference=self._rows(rows["reference"][idx]), text=self._rows(rows["text"][idx]),
          pooled=self._rows(rows["pooled"][idx]), guidance=self._rows(np.full(len(idx), guidance, np.float32)),
          img_ids=self._replicated(self.img_ids), txt_ids=self._replicated(np.zeros((rows["text"].shape[1], 3),
                                                                                   np.float32)))
      keys = jax.random.wrap_key_data(self._rows(keys_data[idx]))
      noise = sampling.initial_noise(keys, (self.grid * self.grid, self.token_channels))
      step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
      x0 = self._rollout(params, self.frozen, cond, noise, jnp.asarray(sigmas), step_keys, solver=sampler)
      x0_parts.append(x0)
      images.append(shd.to_host(self._decode(self.vae, x0)))
    x0 = jnp.concatenate(x0_parts)[:n]
    edits = np.concatenate(images)[:n]
    return x0, edits, src_u[where], rows, sigmas

  def _noise_keys(self, stream: int, epoch: int, n: int) -> np.ndarray:
    base = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), stream), epoch)
    return np.asarray(jax.random.key_data(jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n))))

  def _score(self, sources, edits, records) -> tuple[np.ndarray, np.ndarray]:
    """(scores, valid): an edit that decoded to non-finite pixels is masked (NaN, invalid), never judged."""
    finite = np.isfinite(edits).reshape(len(edits), -1).all(axis=1)
    if not finite.all():
      _LOG.warning("%d of %d edits decoded to non-finite pixels: their rewards are masked", (~finite).sum(), len(edits))
    edits = np.where(finite[:, None, None, None], edits, 0.0)
    result = self.reward.score(list(metrics.to_uint8(sources)), list(metrics.to_uint8(edits)), records,
                               progress=f"epoch {self.epoch} reward" if self.is_main else None)
    valid = result.valid & finite
    return np.where(valid, result.scores, np.nan).astype(np.float32), valid

  # ------------------------------------------------------------------------------------------------
  def run_epoch(self) -> dict:
    config, epoch = self.config, self.epoch
    record_ids = self.sampler.rollouts(epoch)  # the global plan, the same on every process
    records = data_builder.read(self.train_split, record_ids)
    timing = {}

    t0 = time.perf_counter()
    x0, edits, sources, rows, sigmas = self._generate(
        self.state.old_params, records, self._noise_keys(0, epoch, len(records)), steps=config.rollout.num_steps,
        sampler=config.rollout.sampler, guidance=config.rollout.guidance, desc=f"epoch {epoch} rollouts")
    jax.block_until_ready(x0)
    timing["rollout_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores, valid = self._score(sources, edits, records)
    timing["reward_s"] = time.perf_counter() - t0

    self.invalid_streak = 0 if valid.any() else self.invalid_streak + 1
    if not valid.any():
      _LOG.warning("epoch %d: the reward gave no valid score (%d epochs in a row): nothing is learned", epoch,
                   self.invalid_streak)
    result = adv.compute_advantages(record_ids, scores, valid, advantage_config(config))
    self.sampler.ban(result.to_ban)

    t0 = time.perf_counter()
    train_metrics = self._train(x0, rows, sigmas, result, epoch)
    timing["train_s"] = time.perf_counter() - t0

    self.epoch += 1
    s = result.stats
    out = {"reward/mean": s["reward_mean"], "reward/std": s["reward_std"], "reward/min": s["reward_min"],
           "reward/max": s["reward_max"], "reward/invalid": s["invalid_rewards"],
           "filter/kept_fraction": s["kept_fraction"], "filter/groups_filtered": s["groups_filtered"],
           "filter/banned_total": len(self.sampler.banned), "data/prompt_cache_misses": self.prompts.misses,
           "filter/zero_std_fraction": s["zero_std_ratio"], "reward/group_std_mean": s["reward_std_mean"],
           **{f"reward/top{p}_mean": s[f"mean_reward_{p}"] for p in adv.TOP_PERCENTS},
           **train_metrics, **{f"time/{k}": v for k, v in timing.items()},
           "time/rollouts_per_s": len(records) / max(timing["rollout_s"], 1e-9)}
    if self.is_main and config.log_images_every and epoch % config.log_images_every == 0:
      g = min(4, config.data.groups_per_epoch) * config.data.group_size
      self.writer.image(self.epoch, "rollouts", metrics.group_grid(sources[:g], edits[:g], scores[:g],
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

  def _train(self, x0, rows, sigmas, result, epoch) -> dict:
    config = self.config
    size = config.nft.micro_batch * self.rows_multiple
    indices, advantages, mask = result.micro_batches(size, np.random.default_rng([config.seed, epoch, 7]))
    key = self._replicated(jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed + 1), epoch)))
    key = jax.random.wrap_key_data(key)
    cond = sampling.EditCondition(reference=rows["reference"], text=rows["text"], pooled=rows["pooled"],
                                  guidance=np.full(len(rows["pooled"]), self.guidance, np.float32),
                                  img_ids=self.img_ids, txt_ids=np.zeros((rows["text"].shape[1], 3), np.float32))
    launched = []  # device metrics, read once after the last micro-batch: the host never waits in between
    for m in tqdm(range(len(indices)), desc=f"epoch {epoch} train", disable=not self.is_main, leave=False):
      batch = nft.gather_batch(x0, cond, sigmas, indices[m], advantages[m], mask[m])
      self.state, step_metrics = self.nft.accumulate(self.state, self.frozen, self.nft.place(batch, "batch"), key)
      launched.append(step_metrics)
    per_batch = jax.device_get(launched)
    terms = sum(float(b["terms"]) for b in per_batch)
    sums = {k: sum(float(b[k]) * float(b["terms"]) for b in per_batch) for k in ("policy", "kl", "loss")}
    sums["x0_norm"] = sum(float(b["x0_norm"]) for b in per_batch)
    divergence = sum(float(b["old_deviate_sum"]) for b in per_batch) / terms if terms else 0.0
    divergence_sq = sum(float(b["old_deviate_sq_sum"]) for b in per_batch) / terms if terms else 0.0
    self.state, applied = self.nft.apply(self.state)
    self.state, old = self.nft.update_old(self.state)
    if bool(applied["finite"]):
      self.nonfinite_streak = 0
    else:
      self.nonfinite_streak += 1
      _LOG.warning("epoch %d: non-finite gradient or parameters; update refused (%d in a row)", epoch,
                   self.nonfinite_streak)
    out = {f"train/{k}": (sums[k] / terms if terms else 0.0) for k in ("policy", "kl", "loss")}
    out.update({"train/x0_norm": sums["x0_norm"] / max(len(indices), 1), "train/terms": terms,
                "train/micro_batches": len(indices), "train/grad_norm": float(applied["grad_norm"]),
                "train/applied": float(applied["applied"]), "train/step": int(applied["step"]),
                "train/learning_rate": config.optim.learning_rate, "train/ema_decay": float(applied["ema_decay"]),
                "train/old_decay": float(old["old_decay"]),
                # the public code's old-policy divergence: mean((v - v_old)^2) of a term, mean and std over the terms
                "train/old_divergence": divergence,
                "train/old_divergence_std": float(np.sqrt(max(divergence_sq - divergence ** 2, 0.0)))})
    return out

  def evaluate(self) -> dict:
    """One rollout per test record (or the first `eval_samples`) with the EMA parameters, scored by the run's
    reward; the noise is the same at every evaluation."""
    config = self.config
    n = len(self.test_split) if config.eval_samples == -1 else min(config.eval_samples, len(self.test_split))
    records = data_builder.read(self.test_split, range(n))
    _, edits, sources, _, _ = self._generate(
        self.state.ema_params, records, self._noise_keys(1, 0, n), steps=config.rollout.eval_steps,
        sampler=config.rollout.eval_sampler, guidance=config.rollout.eval_guidance, desc="eval")
    scores, valid = self._score(sources, edits, records)
    return {"eval/reward_mean": float(np.mean(scores[valid])) if valid.any() else float("nan"),
            "eval/invalid": int((~valid).sum()), "eval/samples": n}

  # ------------------------------------------------------------------------------------------------
  def _sync(self, name: str) -> None:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(name)

  def _resume_point(self) -> tuple[int, dict] | None:
    """(epoch, meta) of the newest intact checkpoint, or None for a new run. Damaged checkpoints are renamed
    (never deleted) with a warning; a config that changes what the saved state means is refused."""
    intact, damaged = self.checkpoints.intact_epochs()
    newer_damaged = [e for e in damaged if not intact or e > intact[0]]
    self._sync("checkpoints verified")  # every process decided before one renames
    for epoch in newer_damaged:
      message = f"{damaged[epoch]}; it is set aside"
      if self.is_main:
        message += f" as {self.checkpoints.set_aside(epoch)}"
      _LOG.warning(message)
      if self.is_main:
        tqdm.write(f"warning: {message}")
    self._sync("damaged checkpoints set aside")
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
    saved = meta.get("data")
    if saved is None:
      raise ResumeError(f"{self.checkpoints.directory}: the checkpoint does not record its data's fingerprint")
    saved = fingerprint.Fingerprint.from_json(saved)
    if saved.digest == self.data_fingerprint.digest:
      return
    changes = "\n  ".join(fingerprint.differences(saved, self.data_fingerprint))
    if not self.config.data.accept_changed_data:
      raise ResumeError(f"config.data.dataset_dir = {self.config.data.dataset_dir!r}: the dataset changed since the "
                        f"checkpoint was saved:\n  {changes}\nRestore it, use another --workdir, or resume on the "
                        "new data with --config.data.accept_changed_data=True.")
    _LOG.warning("resuming on changed data (config.data.accept_changed_data):\n  %s", changes)

  def _restore(self, epoch: int, meta: dict) -> None:
    try:
      state, meta = self.checkpoints.restore(epoch, {"train": self.state})
    except Exception as e:  # a checkpoint without a manifest can only be checked by reading it
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointDamaged(f"checkpoint {self.checkpoints.path(epoch)} cannot be restored: {first}") from None
    self.state = state["train"]
    self.sampler.restore({"banned": np.asarray(meta["banned"], np.int64)})
    self.epoch, self.nonfinite_streak = int(meta["epoch"]), int(meta["nonfinite_streak"])
    self.invalid_streak = int(meta.get("invalid_streak", 0))
    if self.is_main:
      print(f"resumed from {self.checkpoints.path(epoch)} at epoch {self.epoch}", flush=True)

  def save(self) -> None:
    meta = {"epoch": self.epoch, "step": int(self.state.step), "nonfinite_streak": self.nonfinite_streak,
            "invalid_streak": self.invalid_streak, "banned": [int(i) for i in self.sampler.state()["banned"]],
            "config": run_config.as_json(self.config), "data": self.data_fingerprint.to_json()}
    self.checkpoints.save(self.epoch, {"train": self.state}, meta)

  def _log(self, m: dict) -> None:
    self.writer.scalars(self.epoch, m)
    if self.is_main:
      tqdm.write(metrics.summary_line(self.epoch, self.config.num_epochs, m))

  def run(self, stop_after: int | None = None) -> None:
    """Epochs until config.num_epochs (or `stop_after` more), with evaluation, logging and checkpoints. The state
    is saved before every evaluation, so a failing evaluation never costs training work."""
    config = self.config
    target = config.num_epochs if stop_after is None else min(config.num_epochs, self.epoch + stop_after)
    if self.epoch == 0 and config.eval_every and config.eval_before_training:
      self._log(self.evaluate())
    while self.epoch < target:
      m = self.run_epoch()
      evaluating = config.eval_every and self.epoch % config.eval_every == 0
      if evaluating or self.epoch % config.checkpoint_every == 0 or self.epoch == config.num_epochs:
        self.save()
      if evaluating:
        try:
          m.update(self.evaluate())
        except Exception:
          self._log(m)
          _LOG.error("evaluation after epoch %d failed; its checkpoint is saved in %s", self.epoch,
                     self.checkpoints.path(self.epoch))
          raise
      self._log(m)
    self.writer.close()
