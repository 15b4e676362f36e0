"""Every knob of a training run, with its default and what it means.

Other configs start from `get_config()` here and change what differs. Override any field from the
command line the ml-collections way: `--config.num_epochs=4 --config.rollout.num_steps=6`.
"""

import ml_collections

from editr1_jax.models.flux import DEFAULT_LORA_TARGETS
from editr1_jax.sharding import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_epochs = 100
  c.checkpoint_every = 5  # epochs; a checkpoint is also written after the last epoch and before each evaluation
  c.keep_checkpoints = 3
  # jax's persistent compilation cache: a restarted run on the same topology loads its compiled steps instead of
  # compiling them again. "" = <workdir>/compile_cache ($JAX_COMPILATION_CACHE_DIR when set); a folder or a gs://
  # URL; "none" = off.
  c.compile_cache_dir = ""
  # Training-time evaluation, as the public Kontext run does it: the whole test split every 10 epochs and once
  # before the first update, with the EMA weights, 15 Euler steps at guidance 2.5 (rollout.eval_*). These are not
  # the benchmark-sampling settings (28 steps, guidance 3.5: launch/edit.py's defaults).
  c.eval_every = 10  # epochs (0: never)
  c.eval_before_training = True  # also evaluate the starting weights (epoch 0)
  c.eval_samples = -1  # -1: every test record; N > 0: the first N
  # A programmatic accuracy of the evaluation's edits from their pixels, beside the reward: "" (none) | "world" (the
  # drawn demo world, editr1_jax/demo/world.py: each test record's target image under the dataset's targets/).
  c.eval_accuracy = ""
  # Optionally a benchmark's own protocol at every evaluation too (held-out items of its release, judged by
  # generation with an open Qwen2.5-VL; see launch/evaluate.py for the formats): "" | "gedit" | "imgedit".
  c.eval_benchmark = ""
  c.eval_benchmark_dir = ""  # the release folder (a held-out subset)
  c.eval_benchmark_prompts = ""  # the benchmark's judge prompts (default: found in eval_benchmark_dir)
  c.eval_benchmark_items = ""  # ImgEdit: its items file, either layout (default: found in eval_benchmark_dir)
  c.eval_judge_dir = ""  # the judge: a Qwen2.5-VL folder
  c.eval_judge_max_new_tokens = 512
  # The judge's image pixel bounds (0: its folder's preprocessor_config.json; ImgEdit-Judge: 1016064 / 1354752).
  c.eval_judge_min_pixels = 0
  c.eval_judge_max_pixels = 0
  c.log_images_every = 1  # epochs; TensorBoard image grid of the first groups (0: never)
  c.max_nonfinite_updates = 3  # consecutive refused (non-finite) updates before the run stops
  c.max_invalid_reward_epochs = 3  # consecutive epochs without one valid reward before the run stops
  # Resuming checks the saved config: a change to any field that changes what the saved state means (LoRA, seed,
  # G, k, models, dtypes, ...) is refused with every difference listed, unless the field is named here, e.g.
  # --config.resume_accept="('optim.learning_rate',)". Cadence, logging and evaluation fields may always change.
  c.resume_accept = ()

  # Models. `family` names the base model (docs: WORKSPACE.md "Adding a base model"); `preset` "tiny" builds
  # its small random models in code (CPU demo, tests); otherwise weights are read from `pipeline_dir`, the
  # family's diffusers folder (Kontext: transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
  # tokenizer_2/, scheduler/).
  c.model = ml_collections.ConfigDict()
  c.model.family = "kontext"  # the base model's family (editr1_jax.families.FAMILIES)
  c.model.preset = ""  # "" reads pipeline_dir; "tiny" builds the family's small random models in code
  c.model.pipeline_dir = ""
  # Qwen-Image-Edit only: the release, "2509" or "2511" (its transformer's zero_cond_t). "" takes pipeline_dir's own;
  # the tiny preset and a plan without a folder then build 2509. A named release is checked against the folder.
  c.model.release = ""
  c.model.dtype = "bfloat16"  # compute dtype of the transformer, VAE and text encoders
  c.model.param_dtype = "bfloat16"  # storage dtype of the frozen base weights
  c.model.adapter_dtype = "float32"  # adapters, EMA, old policy and optimizer state
  c.model.remat = "flux"  # none | full | flux (keep q/k/v and attention outputs)
  # every network of the run (policy, VAE, text encoders, judge): auto (splash on TPU, cuDNN on GPU where it can,
  # XLA on CPU) | xla | cudnn | splash (editr1_jax/attention.py)
  c.model.attention_impl = "auto"
  # Each kind of transformer block stacked and run by one lax.scan: compile time and host memory independent of
  # depth, one block's weights gathered at a time under FSDP. False keeps the blocks apart, as do LoRA targets that
  # name some blocks only. Checkpoints of one layout do not restore into the other; exports are the same.
  c.model.scan_blocks = True
  c.model.init_lora = ""  # optional diffusers/peft LoRA file to start from

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 32
  c.lora.alpha = 64.0
  c.lora.targets = DEFAULT_LORA_TARGETS

  # Reward: "mllm" scores with Qwen2.5-VL from its digit logits; "colour" is a programmatic reward
  # (closeness of the edit's mean colour to the colour named in the instruction) for demos and tests.
  c.reward = ml_collections.ConfigDict()
  c.reward.kind = "mllm"
  c.reward.model_dir = ""  # a transformers Qwen2.5-VL folder
  c.reward.tiny = False  # a small random Qwen2.5-VL built in code with the shipped tiny tokenizer
  c.reward.template_file = ""  # judging prompt with {instruction} and {requirement}; empty: ours
  c.reward.dtype = "bfloat16"
  c.reward.batch_size = 8  # pairs per scoring call
  # Keep the judge's weights in host memory except while it scores (same shardings, memory kind pinned_host): the
  # rollout and NFT steps then have the chips' memory without it (launch/plan.py shows when that is needed).
  c.reward.offload = False

  c.data = ml_collections.ConfigDict()
  c.data.dataset_dir = ""  # Edit-R1 folder: images/, train_metadata.jsonl, test_metadata.jsonl
  c.data.tfds_dir = ""  # where the array_record copy is written (default: <workdir>/tfds)
  c.data.groups_per_epoch = 24  # G: distinct records per epoch, independent of the device count
  c.data.group_size = 12  # k: rollouts per record
  c.data.resolution = 512  # square training resolution (center crop + Lanczos)
  c.data.t5_max_length = 128  # Kontext: T5 tokens of an instruction
  # Qwen-Image-Edit: tokens of the Qwen2.5-VL prompt after the dropped system turn, condition-image tokens included
  # (a 384x384-area image is ~196 tokens); a longer prompt is an error naming it.
  c.data.text_max_length = 384
  c.data.prompt_cache_entries = 4096  # instruction embeddings kept (least recently used dropped beyond)
  c.data.ban_filtered = False  # filtered records never come back in later epochs
  c.data.allow_outside_paths = False  # accept `image` paths that leave the dataset folder (../x.png, /abs/x.png)
  # The data copy records the folder and a fingerprint of its metadata and images: a changed dataset is copied
  # anew for a new run, and refused when resuming (the message says what changed) unless this is True.
  c.data.accept_changed_data = False

  c.rollout = ml_collections.ConfigDict()
  c.rollout.sampler = "dpm2"  # dpm2 (deterministic DPM-Solver++(2M)) | euler | sde
  c.rollout.num_steps = 6
  c.rollout.guidance = 2.5  # Kontext: the FLUX guidance embedding (no CFG); Qwen-Image-Edit: true CFG scale (1: none)
  c.rollout.sde_noise = 0.7  # noise level a of the flow SDE sampler
  c.rollout.batch_size = 4  # rollouts per data-parallel shard (data x fsdp) per sampling / encoding call
  c.rollout.eval_steps = 15  # training-time evaluation (see eval_every)
  c.rollout.eval_guidance = 2.5
  c.rollout.eval_sampler = "euler"

  c.advantage = ml_collections.ConfigDict()
  c.advantage.std = "global"  # global | group
  c.advantage.rloo = False
  c.advantage.clip = 5.0  # c in the NFT loss
  c.advantage.mode = "all"  # all | positive | negative | binary | zero (a control: no signal from the rewards)

  c.filter = ml_collections.ConfigDict()
  # paper: drop a group when mean > tau_mu AND std < tau_sigma, ban the same | public (the public code): drop
  # unless std > tau_sigma AND mean < tau_mu (on OR), ban only when std < tau_sigma AND mean > tau_mu | none.
  # Banning happens only with data.ban_filtered.
  c.filter.semantics = "paper"
  c.filter.tau_mu = 0.9
  c.filter.tau_sigma = 0.05

  c.nft = ml_collections.ConfigDict()
  c.nft.beta = 1.0  # NFT mixing coefficient (not the KL weight)
  c.nft.kl_weight = 1e-4
  c.nft.timestep_fraction = 0.99  # T = int(num_steps * fraction) training timesteps per sample
  c.nft.micro_batch = 3  # samples per device per micro-batch
  c.nft.old_policy_schedule = 1  # 0 | 1 | 2 (docs/METHOD.md section 7)
  c.nft.ema_max_decay = 0.9

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 3e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 1e-4
  c.optim.eps = 1e-8
  c.optim.grad_clip = 1.0
  c.optim.full_finetune = False  # train every transformer weight instead of the adapter

  # Mesh axes (data, fsdp, tensor); -1 takes the remaining devices. Rules map logical axis names to them.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)
  c.mesh.rules = DEFAULT_RULES
  return c
