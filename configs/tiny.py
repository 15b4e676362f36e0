"""The CPU demo: tiny random models built in code, the shipped tiny tokenizers and demo dataset.

  python launch/train.py --config=configs/tiny.py --workdir=/tmp/editr1_demo
"""

import os

from configs import base

DEMO_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "editr1_jax", "data", "demo")


def get_config():
  c = base.get_config()
  c.num_epochs = 4
  c.checkpoint_every = 2
  c.eval_every = 2
  c.eval_samples = 4
  c.model.preset = "tiny"
  c.model.dtype = c.model.param_dtype = "float32"
  c.model.remat = "none"
  c.lora.rank, c.lora.alpha = 4, 8.0
  c.reward.kind = "mllm"
  c.reward.tiny = True
  c.reward.dtype = "float32"
  c.reward.batch_size = 8
  c.data.dataset_dir = DEMO_DATA
  c.data.groups_per_epoch = 4
  c.data.group_size = 4
  c.data.resolution = 64
  c.data.t5_max_length = 16
  c.rollout.num_steps = 4
  c.rollout.batch_size = 8
  c.rollout.eval_steps = 4
  c.nft.micro_batch = 4
  c.optim.learning_rate = 1e-3
  c.mesh.shape = (-1, 1, 1)
  return c
