"""The CPU demo on the Qwen-Image-Edit family: tiny random Qwen-Image transformer, VAE and Qwen2.5-VL prompt
encoder built in code (the shipped tiny Qwen tokenizer), the shipped demo data.

  python launch/train.py --config=configs/tiny_qwen_image_edit.py --workdir=/tmp/editr1_qwen_demo
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.model.family = "qwen_image_edit"
  c.data.text_max_length = 96  # the tiny tokenizer's prompt after its system turn: ~40-70 tokens
  c.rollout.guidance = 1.0  # no true CFG in training rollouts
  c.rollout.eval_guidance = 1.0
  return c
