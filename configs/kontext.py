"""The paper's FLUX.1-Kontext-dev run (docs/METHOD.md section 7).

  python launch/train.py --config=configs/kontext.py --workdir=gs://my-bucket/runs/kontext \
    --config.model.pipeline_dir=gs://my-bucket/models/FLUX.1-Kontext-dev \
    --config.reward.model_dir=gs://my-bucket/models/Qwen2.5-VL-32B-Instruct \
    --config.data.dataset_dir=gs://my-bucket/data/edit_r1

Every path may be a local folder or a gs:// URL; on a TPU pod slice, `launch/tpu_pod.sh` runs it on every host.

`--config=configs/kontext.py:v5e-16` adds the settings that fit the run on that TPU slice (SLICES).
"""

from configs import base

# What each slice needs beyond the paper's settings to fit every step with margin, as `launch/plan.py
# --config=configs/kontext.py:<slice> --topology=<slice>` measured it (README "Will it fit?"; FSDP over all chips),
# with the attention a TPU run uses (`model.attention_impl` "auto": the splash kernel).
# Offloading keeps the 32B judge in host memory between reward steps; full remat recomputes each block in the
# backward pass instead of keeping its q/k/v and attention output.
SLICES = {  # the worst step's live bytes per chip, of the HBM the compiler offers
    "v5p-8": {},  # NFT step 39.3 of 95.74 GiB (49.4 with XLA attention)
    # NFT step 25.1 of 31.25 GiB with the splash kernel, epoch roofline 142 s; XLA attention needed full remat here
    # (19.2 GiB, 174 s; without it 29.0 GiB, too tight)
    "v6e-8": {},
    "v4-8": {"reward.offload": True, "model.remat": "full"},  # judge prefill 26.0 of 30.75 GiB
    # NFT step 12.2 of 15.75 GiB with the 32B judge resident and the splash kernel (XLA attention needed the judge
    # offloaded: 12.4 GiB)
    "v5e-16": {"model.remat": "full"},
}


def get_config(slice_name: str = ""):
  """The paper's run; `slice_name` (a key of SLICES) adds that TPU slice's settings."""
  if slice_name and slice_name not in SLICES:
    raise ValueError(f"configs/kontext.py:{slice_name}: no settings for that slice; measured: {sorted(SLICES)}")
  c = base.get_config()
  c.num_epochs = 300
  c.model.pipeline_dir = ""  # required: the FLUX.1-Kontext-dev diffusers folder
  c.reward.kind = "mllm"
  c.reward.model_dir = ""  # required: Qwen2.5-VL-32B-Instruct
  c.data.dataset_dir = ""  # required
  c.data.resolution = 512
  c.data.groups_per_epoch = 24
  c.data.group_size = 12
  c.data.t5_max_length = 128
  c.rollout.sampler = "dpm2"
  c.rollout.num_steps = 6
  c.rollout.guidance = 2.5
  c.lora.rank, c.lora.alpha = 32, 64.0
  c.optim.learning_rate = 3e-4
  c.nft.beta, c.nft.kl_weight = 1.0, 1e-4
  c.nft.micro_batch = 3
  c.nft.old_policy_schedule = 1
  c.nft.ema_max_decay = 0.9
  c.filter.semantics, c.filter.tau_mu, c.filter.tau_sigma = "paper", 0.9, 0.05
  c.mesh.shape = (1, -1, 1)  # FSDP over every device
  for field, value in SLICES.get(slice_name, {}).items():
    section, name = field.split(".")
    c[section][name] = value
  return c
