"""Export to PyTorch: diffusers LoRA files and merged diffusers transformer folders (no torch needed), to a local
folder or a gs:// URL."""

import json

import jax
import numpy as np
from flax import nnx

from editr1_jax import paths, run_config
from editr1_jax import weights as wio
from editr1_jax.checkpoint import CheckpointDamaged, Checkpointer
from editr1_jax.layers import LoraSpec
from editr1_jax.models import flux

LORA_FILE = "pytorch_lora_weights.safetensors"
SHARD_BYTES = 5 * 1024**3  # diffusers' default max shard size


def lora_tensors(adapters, spec: LoraSpec,
                 table=flux.FLUX_LORA_WEIGHTS) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Adapter state -> (diffusers LoRA tensors with the `transformer.` prefix, safetensors metadata).

  The metadata carries rank and alpha the way diffusers' `save_lora_weights` writes them, so
  `load_lora_weights` applies the same alpha / rank scale we trained with.
  """
  tensors = {f"transformer.{k}": v for k, v in wio.to_reference(adapters, table).items()}
  modules = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in tensors})
  config = {"transformer.r": spec.rank, "transformer.lora_alpha": spec.alpha,
            "transformer.target_modules": modules, "transformer.init_lora_weights": "gaussian"}
  return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}


def save_lora(adapters, spec: LoraSpec, out_dir: str, table=flux.FLUX_LORA_WEIGHTS) -> str:
  """`table`: the family's adapter weight table (its `lora_weight_table`)."""
  paths.makedirs(out_dir)
  tensors, metadata = lora_tensors(adapters, spec, table)
  path = paths.join(out_dir, LORA_FILE)
  wio.save_safetensors(tensors, path, metadata=metadata)
  return path


def merge_adapters(adapters, base, spec: LoraSpec):
  """Base state with W <- W + (alpha / rank) A B folded in (adapter 0), for every adapted Dense."""
  merged = dict(nnx.to_flat_state(base))
  lora = dict(nnx.to_flat_state(adapters))
  for path, a in lora.items():
    if path[-1] != "lora_a":
      continue
    kernel_path = path[:-1] + ("kernel",)
    # adapter 0: the adapter axis is the third from last (after a stacked parameter's block axis)
    a0 = np.asarray(jax.device_get(a.get_value()))[..., 0, :, :].astype(np.float64)
    b0 = np.asarray(jax.device_get(lora[path[:-1] + ("lora_b",)].get_value()))[..., 0, :, :].astype(np.float64)
    w = merged[kernel_path]
    value = np.asarray(jax.device_get(w.get_value()))
    merged[kernel_path] = w.replace((value.astype(np.float64) + spec.scale * a0 @ b0).astype(value.dtype))
  return nnx.from_flat_state(list(merged.items()))


def save_transformer(base, cfg, out_dir: str, table=flux.FLUX_WEIGHTS) -> str:
  """A diffusers transformer folder (`cfg.to_diffusers_config()` as config.json, `table` the family's
  `weight_table`): config.json + safetensors shards + index json."""
  paths.makedirs(out_dir)
  tensors = wio.to_reference(base, table)
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    if current and size + tensors[name].nbytes > SHARD_BYTES:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensors[name]
    size += tensors[name].nbytes
  shards.append(current)
  if len(shards) == 1:
    wio.save_safetensors(shards[0], paths.join(out_dir, "diffusion_pytorch_model.safetensors"),
                         metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
      file = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
      wio.save_safetensors(shard, paths.join(out_dir, file), metadata={"format": "pt"})
      weight_map.update({n: file for n in shard})
    total = sum(a.nbytes for a in tensors.values())
    paths.write_text(paths.join(out_dir, "diffusion_pytorch_model.safetensors.index.json"),
                     json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  paths.write_text(paths.join(out_dir, "config.json"), json.dumps(cfg.to_diffusers_config(), indent=2))
  return out_dir


def export_run(workdir: str, out: str, *, weights: str = "ema", merged: bool = False,
               epoch: int | None = None) -> list[str]:
  """A training run's checkpoint -> `save_lora` (and `save_transformer` of the merged weights) under `out`;
  a full fine-tune run -> `save_transformer` of its weights."""
  from editr1_jax import families, train_loop  # the run's own builders, so the export sees the trained model
  ckpt = Checkpointer(paths.join(workdir, "checkpoints"), create=False)
  epochs = ckpt.all_epochs()
  epoch = (epochs[-1] if epochs else None) if epoch is None else epoch  # the newest, never an older one silently
  try:
    if epoch not in epochs:
      raise CheckpointDamaged("no such checkpoint" if epoch is not None else "no checkpoint")
    ckpt.verify(epoch)
  except CheckpointDamaged as e:
    raise FileNotFoundError(f"{ckpt.directory}: cannot export epoch {epoch}: {e}; intact epochs: "
                            f"{ckpt.intact_epochs()[0]}") from None
  meta = ckpt.restore_meta(epoch)
  config = run_config.saved_config(meta["config"])
  family = families.family_class(config.model.family)
  spec = families.lora_spec(config)
  transformer = family.transformer_from_config(config, mesh=None, rules=train_loop.mesh_rules(config))
  trainer, params, frozen = train_loop.build_nft_trainer(config, family, transformer)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        jax.eval_shape(trainer.init, params))
  state, _ = ckpt.restore(epoch, {"train": target})
  trained = state["train"].ema_params if weights == "ema" else state["train"].params
  if spec is None:  # full fine-tune: the trained weights are the transformer
    return [save_transformer(trained, transformer.cfg, paths.join(out, "transformer"), family.weight_table)]
  written = [save_lora(trained, spec, out, family.lora_weight_table)]
  if merged:
    written.append(save_transformer(merge_adapters(trained, frozen, spec), transformer.cfg,
                                    paths.join(out, "transformer"), family.weight_table))
  return written
