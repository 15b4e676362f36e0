"""The CPU demo of the method: Edit-R1 post-trains a tiny trained editor under a tiny trained MLLM judge, and an
independent programmatic check of the held-out edits' pixels shows whether it improves.

  python launch/train.py --config=configs/demo.py --workdir=/tmp/editr1_demo

Everything is shipped and real: the drawn editing world (`editr1_jax/data/world/`, made by
`python -m editr1_jax.demo.world`), the editor (a FLUX.1-Kontext pipeline folder, `editr1_jax/assets/demo/editor/`)
and the judge (a Qwen2.5-VL folder, `editr1_jax/assets/demo/judge/`, with its prompt `judge_prompt.txt`), both
trained by `python -m editr1_jax.demo.train_assets --train` and read through the same loaders as the released
models. Per epoch the console and TensorBoard show the judge's reward (the logit score, filtered groups, NFT, EMA as
in the paper's run) and, every EVAL_EVERY epochs, eval/accuracy: the fraction of the 64 held-out edits (instruction /
colour combinations never trained on) that a pixel check against the drawn target calls correct; it never asks the
judge. `images/before_after.png` shows the same held-out sources edited before training and now.
`configs/tiny.py` (random tiny models) stays the smoke test of every code path.
"""

import os

from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "editr1_jax", "assets", "demo")
WORLD = os.path.join(ROOT, "editr1_jax", "data", "world")
EVAL_EVERY = 10


def get_config():
  c = tiny.get_config()
  c.num_epochs = 40
  c.checkpoint_every = 20
  c.eval_every = EVAL_EVERY
  c.eval_samples = -1  # the whole held-out split: 64 items
  c.eval_accuracy = "world"
  c.model.preset = ""
  c.model.pipeline_dir = os.path.join(ASSETS, "editor")
  c.reward.kind = "mllm"
  c.reward.tiny = False
  c.reward.model_dir = os.path.join(ASSETS, "judge")
  c.reward.template_file = os.path.join(ASSETS, "judge_prompt.txt")
  c.reward.batch_size = 32
  c.data.dataset_dir = WORLD
  c.data.resolution = 64
  c.data.t5_max_length = 16  # train_assets.T5_MAX_LENGTH: the length the editor was trained to read
  c.data.groups_per_epoch = 16
  c.data.group_size = 8
  # The sampler, steps and guidance the editor was trained and validated with (train_assets: NUM_STEPS, SOLVER,
  # GUIDANCE), for rollouts and evaluation alike.
  c.rollout.sampler = c.rollout.eval_sampler = "dpm2"
  c.rollout.num_steps = c.rollout.eval_steps = 6
  c.rollout.guidance = c.rollout.eval_guidance = 2.5
  c.rollout.batch_size = 32
  c.nft.micro_batch = 16
  c.lora.rank, c.lora.alpha = 8, 16.0
  return c
