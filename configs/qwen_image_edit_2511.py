"""Edit-R1 on Qwen-Image-Edit-2511, the current release of the Qwen-Image-Edit line.

  python launch/train.py --config=configs/qwen_image_edit_2511.py --workdir=gs://... \
    --config.model.pipeline_dir=/ckpt/Qwen-Image-Edit-2511 --config.reward.model_dir=/ckpt/Qwen2.5-VL-32B-Instruct \
    --config.data.dataset_dir=/data/edit_r1

2511's diffusers folder is 2509's pipeline (QwenImageEditPlusPipeline) with one change in the transformer:
zero_cond_t (the condition images' tokens are modulated at t = 0; editr1_jax/models/qwen_image.py). Its tensors,
sizes and prompt encoder are 2509's, so every setting here is the 2509 run's (configs/qwen_image_edit.py): no
published Edit-R1 / DiffusionNFT recipe for 2511 with other method settings was found to follow. `model.release`
makes the run refuse a 2509 folder, and lets a plan without a folder (launch/plan.py) build 2511's transformer.
"""

from configs import qwen_image_edit


def get_config():
  c = qwen_image_edit.get_config()
  c.model.release = "2511"
  return c
