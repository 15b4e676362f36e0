"""Edit-R1 on Qwen-Image-Edit-2509, as the public run trains it (docs/METHOD.md section 7, "Qwen-Image-Edit").

  python launch/train.py --config=configs/qwen_image_edit.py --workdir=gs://... \
    --config.model.pipeline_dir=/ckpt/Qwen-Image-Edit-2509 --config.reward.model_dir=/ckpt/Qwen2.5-VL-32B-Instruct \
    --config.data.dataset_dir=/data/edit_r1

What differs from the Kontext run: the family, the prompt length (Qwen2.5-VL tokens, the condition image's
included), and guidance: Qwen-Image-Edit has no guidance embedding, its pipeline guides by true CFG, which the
public run does not use in rollouts (guidance 1 = none) nor in its training-time evaluation.
"""

from configs import kontext


def get_config():
  c = kontext.get_config()
  c.model.family = "qwen_image_edit"
  c.model.pipeline_dir = ""  # required: the Qwen-Image-Edit-2509 diffusers folder
  c.data.resolution = 512  # 512 x 512 (center crop + Lanczos), the condition image seen by the VAE at that size
  c.data.text_max_length = 384
  # One cached prompt is 384 x 3584 bfloat16 values, 2.6 MiB: 1024 entries (the test split's prompts, re-encoded at
  # every evaluation otherwise) hold 2.7 GiB of host memory.
  c.data.prompt_cache_entries = 1024
  c.rollout.guidance = 1.0
  c.rollout.eval_guidance = 1.0
  return c
