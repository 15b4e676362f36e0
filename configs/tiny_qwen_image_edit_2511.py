"""The CPU demo on Qwen-Image-Edit-2511's architecture: configs/tiny_qwen_image_edit.py with the tiny transformer
built with zero_cond_t (condition-image tokens modulated at t = 0).

  python launch/train.py --config=configs/tiny_qwen_image_edit_2511.py --workdir=/tmp/editr1_qwen_2511_demo
"""

from configs import tiny_qwen_image_edit


def get_config():
  c = tiny_qwen_image_edit.get_config()
  c.model.release = "2511"
  return c
