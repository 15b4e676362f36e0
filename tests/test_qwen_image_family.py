"""The qwen_image_edit family end to end against diffusers' `QwenImageEditPlusPipeline` on a tiny pipeline folder
(`qwen_image_pipeline_fixtures`): Euler rollouts with one and two condition images, true CFG, the schedule, a LoRA
file of ours loaded by the pipeline, and the merged-transformer export read by diffusers."""

import math
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import float32_bound, max_rel_err
from qwen_fixtures import random_image
from qwen_image_fixtures import EXACT, LORA, ONE_REFERENCE, QWEN_IMAGE_BOUND, make_inputs, torch_forward
from qwen_image_pipeline_fixtures import reference_pipeline

from editr1_jax import export, families, latents, pipeline, rollouts, streams
from editr1_jax.families import qwen_image as fq
from editr1_jax.layers import LoraSpec
from editr1_jax.models import qwen_image as qi

# The condition images are given at the size the pipeline's VAE resize keeps (VAE_IMAGE_SIZE, patched to their
# area: sides multiples of 32 at that area map to themselves), so both sides encode identical pixels; the VL
# resize (CONDITION_IMAGE_SIZE, left at 384 x 384) is the same function on both sides and the tiny processor's
# max_pixels caps what the VL sees. The target is another non-square size (multiples of 16).
SOURCE, SECOND = (32, 64), (64, 32)  # (height, width) of the condition images
VAE_AREA = SOURCE[0] * SOURCE[1]  # = SECOND's area
HEIGHT, WIDTH = 48, 80
GRID = (HEIGHT // 16, WIDTH // 16)  # packed target tokens: the VAE's 8x down, then 2x2 packing
INSTRUCTION = "make the sky red"
STEPS = 3
CFG = 4.0
MAX_LENGTH = 320  # text tokens after the template's dropped prefix (the tiny tokenizer is nearly per character)

# float32 rounding (helpers.float32_bound). The longest reduction is the VL patch embedding, K = 3 x 2 x 14 x 14 =
# 1176 (the VL's and the transformer's sequences are shorter: asserted in test_folder_...). In sequence on the path
# to x0: the VL encoder 41 (test_qwen_image_conditioning), the VAE encoder 53 (test_qwen_image_vae) and STEPS
# transformer calls of 32 (qwen_image_fixtures); the decoded images add the VAE decoder's 69.
VL_PATCH = 3 * 2 * 14 * 14
TEXT_BOUND = float32_bound(VL_PATCH, depth=41)  # the prompt embeddings: 5.2e-5
ENCODE_BOUND = float32_bound(3 * 3 * 16, depth=53)  # the condition latents (3x3 convs over 16 channels): 2.1e-5
X0_DEPTH = 41 + 53 + STEPS * 32
# Timesteps: numpy's and torch's float32 exp round about half of the 128 sinusoid frequencies one ulp apart
# (qwen_image_fixtures.QWEN_IMAGE_REAL_BOUND), and the pipeline gives the transformer fl(fl(1000 sigma) / 1000),
# two roundings (2^-23 relative) from our sigma: each moves a sinusoid of argument <= 1000 sigma rad (sigma <= 1) by
# up to 1000 x 2^-23, passed on about 1:1 to the step's velocity; the velocities enter x0 weighted by the steps'
# |d sigma|, which sum to 1.
TIMESTEP = 2 * 1000 * 2.0 ** -23  # 2.4e-4
ROLLOUT_BOUND = float32_bound(VL_PATCH, depth=X0_DEPTH) + TIMESTEP  # 3.5e-4
DECODE_BOUND = float32_bound(VL_PATCH, depth=X0_DEPTH + 69) + TIMESTEP  # 3.7e-4
# True CFG, v = n + s (p - n) rescaled to |p|: the rounding errors of p and n (other prompts, independent) enter with
# weights s and s - 1, the rescale adds |p|'s own: sqrt(s^2 + (s - 1)^2 + 1). The timestep's is the same in p and n
# (same sigma), so it cancels in p - n and passes 1:1.
CFG_BOUND = float32_bound(VL_PATCH, depth=X0_DEPTH, condition=math.sqrt(CFG**2 + (CFG - 1)**2 + 1)) + TIMESTEP  # 8e-4
LORA_SPEC = LoraSpec(rank=LORA.rank, alpha=LORA.alpha, targets=LORA.targets + ("img_mod.1",))  # + a modulation


@pytest.fixture(scope="module", autouse=True)
def vae_area():
  """The pipeline's VAE input area, module-wide (the pipeline runs live in module fixtures)."""
  from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(module, "VAE_IMAGE_SIZE", VAE_AREA)
    yield


def images(two: bool = False):
  """The condition images (PIL, uint8 RGB)."""
  first = random_image(*SOURCE, seed=0)
  return [first, random_image(*SECOND, seed=1)] if two else [first]


def noise() -> np.ndarray:
  """The initial packed noise (1, L, C) both sides start from."""
  return np.random.default_rng(1).standard_normal((1, GRID[0] * GRID[1], 16)).astype(np.float32)


def run_reference(pipe, condition_images, cfg: float = 1.0) -> tuple[np.ndarray, np.ndarray, list[dict]]:
  """(final packed latents, images in [0, 1], the arguments of every transformer call) of one pipeline call from
  `noise()`."""
  final, calls = {}, []

  def keep(_, i, t, tensors):  # the latents after each step: the last call's are the sampler's x0
    final["x0"] = tensors["latents"].clone()
    return {}

  def record(module, args, kwargs):
    calls.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

  hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
  try:
    with torch.no_grad():
      out = pipe(image=condition_images, prompt=INSTRUCTION, negative_prompt=fq.NEGATIVE_PROMPT if cfg > 1 else None,
                 true_cfg_scale=cfg, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                 latents=torch.from_numpy(noise()), output_type="np", callback_on_step_end=keep)
  finally:
    hook.remove()
  return final["x0"].numpy(), out.images, calls


def check_condition(cond, calls: list[dict], sigmas: np.ndarray, sizes: list[tuple[int, int]]) -> None:
  """Our condition rows equal what the pipeline gave its transformer: the condition images' packed latents, the
  prompt (and negative prompt) embeddings with their real length, the rotary layout, the timesteps. These are the
  inputs where a small error could hide in the tiny network's weak dependence on them. `sizes`: the condition
  images' (height, width)."""
  n = GRID[0] * GRID[1]
  per_step = 2 if cond.negative is not None else 1
  assert len(calls) == STEPS * per_step
  first = calls[0]
  assert first["img_shapes"] == [[(1, *GRID)] + [(1, h // 16, w // 16) for h, w in sizes]]
  err = max_rel_err(cond.reference, first["hidden_states"][:, n:].numpy())
  print(f"condition latents max_rel_err {err:.2e} (bound {ENCODE_BOUND:.1e})")
  assert err <= ENCODE_BOUND
  prompts = [cond.prompt] + ([cond.negative] if per_step == 2 else [])
  for prompt, call in zip(prompts, calls):  # the pipeline's mask is None: every one of its tokens is real
    ref = call["encoder_hidden_states"].numpy()
    length = ref.shape[1]
    assert call["encoder_hidden_states_mask"] is None and prompt.mask.sum() == length and prompt.mask[0, :length].all()
    err = max_rel_err(prompt.embeds[:, :length], ref)
    print(f"prompt embeddings ({length} tokens) max_rel_err {err:.2e} (bound {TEXT_BOUND:.1e})")
    assert err <= TEXT_BOUND
  image_positions, _ = qi.rope_positions(first["img_shapes"], MAX_LENGTH)
  np.testing.assert_array_equal(cond.image_positions, image_positions)
  timesteps = np.array([c["timestep"].numpy()[0] for c in calls[::per_step]])
  assert np.all(np.abs(timesteps - sigmas[:-1]) <= 2.0 ** -23 * sigmas[:-1])  # TIMESTEP's two roundings


def to_unit(images_pm1: np.ndarray) -> np.ndarray:
  """Our [-1, 1] images as the pipeline's "np" output maps them."""
  return np.clip(images_pm1 / 2 + 0.5, 0, 1)


@pytest.fixture(scope="module")
def editor(qwen_edit_pipeline):  # noqa: F811
  return pipeline.Editor.from_folder(qwen_edit_pipeline[0], family="qwen_image_edit", max_sequence_length=MAX_LENGTH)


def edit(editor, guidance: float = 1.0):
  return editor(images(), [INSTRUCTION], height=HEIGHT, width=WIDTH, num_steps=STEPS, guidance=guidance,
                solver="euler", noise=noise(), auto_resize=False)


@pytest.fixture(scope="module")
def plain(qwen_edit_pipeline, editor):  # noqa: F811
  """One condition image, no CFG, both sides: the pipeline's x0, images, transformer calls and its scheduler's sigmas
  after the run; our images and rollout."""
  pipe = qwen_edit_pipeline[1]
  ref_x0, ref_images, calls = run_reference(pipe, images())
  sigmas = pipe.scheduler.sigmas.numpy().copy()
  ours, rollout = edit(editor)
  return dict(ref_x0=ref_x0, ref_images=ref_images, calls=calls, sigmas=sigmas, images=ours, x0=np.asarray(rollout.x0),
              rollout_sigmas=rollout.sigmas)


def condition_of(family, condition_images, guidance: float = 1.0):
  """The family's condition rows of one instruction on `condition_images` (PIL), as the Editor computes them."""
  sources = [latents.to_array(im)[None] for im in condition_images]
  return family.condition(sources, [INSTRUCTION], grid=GRID, guidance=guidance)


# --------------------------------------------------------------------------------------------------
def test_folder_is_a_qwen_image_edit_pipeline(qwen_edit_pipeline, editor):  # noqa: F811
  from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import VAE_IMAGE_SIZE, calculate_dimensions
  assert families.family_of_folder(qwen_edit_pipeline[0]) == "qwen_image_edit"
  family = editor.family
  assert family.transformer.cfg.joint_attention_dim == family.text.cfg.hidden_size
  assert family.transformer.cfg.in_channels == 4 * family.vae.cfg.z_dim == noise().shape[-1]
  assert family.shift == fq.QWEN_SHIFT  # the folder's scheduler config is Qwen-Image's
  for height, width in (SOURCE, SECOND):  # the pipeline keeps the condition images' size
    assert VAE_IMAGE_SIZE == VAE_AREA and calculate_dimensions(VAE_IMAGE_SIZE, width / height) == (width, height)
  # the bounds' longest reduction: the VL sequence (template prefix + text) and the transformer's are shorter
  assert family.text.drop + MAX_LENGTH < VL_PATCH and MAX_LENGTH + 3 * GRID[0] * GRID[1] < VL_PATCH


def test_euler_rollout_equals_pipeline(plain, editor):
  check_condition(condition_of(editor.family, images()), plain["calls"], plain["sigmas"], [SOURCE])
  x0, ref_x0 = plain["x0"], plain["ref_x0"]
  assert x0.shape == ref_x0.shape == noise().shape
  err = max_rel_err(x0, ref_x0)
  print(f"x0 max_rel_err {err:.2e} (bound {ROLLOUT_BOUND:.1e})")
  assert err <= ROLLOUT_BOUND
  assert max_rel_err(x0, noise()) > 0.1  # the steps moved the latents
  assert plain["images"].shape == plain["ref_images"].shape == (1, HEIGHT, WIDTH, 3)
  err = max_rel_err(to_unit(plain["images"]), plain["ref_images"])
  print(f"images max_rel_err {err:.2e} (bound {DECODE_BOUND:.1e})")
  assert err <= DECODE_BOUND


def test_sigmas_equal_the_pipeline_scheduler(plain, editor):
  sigmas = plain["sigmas"]
  assert len(sigmas) == STEPS + 1 and sigmas[-1] == 0 and sigmas[-2] == pytest.approx(0.02, rel=1e-5)
  np.testing.assert_array_equal(editor.family.sigmas(STEPS, GRID), sigmas)  # the same float32 arithmetic
  np.testing.assert_array_equal(plain["rollout_sigmas"], sigmas)  # what the rollout ran on


def test_two_condition_images_equal_pipeline(qwen_edit_pipeline, editor, plain):  # noqa: F811
  """The family takes a row's images as a list of batches (the Editor takes one image per row): rollouts.generate as
  Editor.__call__ runs it, on the family's condition of both images."""
  family = editor.family
  ref_x0, _, calls = run_reference(qwen_edit_pipeline[1], images(two=True))
  cond = condition_of(family, images(two=True))
  check_condition(cond, calls, plain["sigmas"], [SOURCE, SECOND])
  graphdef, state = nnx.split(family.transformer)
  sampler = rollouts.Sampler(family, lambda s: nnx.merge(graphdef, s))
  x0, _, _ = rollouts.generate(sampler, state, cond, streams.row_keys(0, "edit", 0, 1), grid=GRID, num_steps=STEPS,
                               solver="euler", chunk=1, noise=noise())
  err = max_rel_err(x0, ref_x0)
  print(f"two images: x0 max_rel_err {err:.2e} (bound {ROLLOUT_BOUND:.1e})")
  assert err <= ROLLOUT_BOUND
  assert max_rel_err(x0, plain["x0"]) > 10 * ROLLOUT_BOUND  # the second image matters, far beyond the bound


def test_a_2511_folder_edits_as_the_pipeline_does(qwen_edit_pipeline, plain, tmp_path):  # noqa: F811
  """Qwen-Image-Edit-2511's folder is 2509's with `zero_cond_t: true` in transformer/config.json: the Editor reads
  it from the folder (family and release) and its rollout with two condition images equals diffusers' pipeline."""
  import json
  import shutil
  folder = str(tmp_path / "qwen_image_edit_2511")
  shutil.copytree(qwen_edit_pipeline[0], folder)
  config_path = os.path.join(folder, "transformer", "config.json")
  config = json.load(open(config_path))
  json.dump({**config, "zero_cond_t": True}, open(config_path, "w"))
  assert families.family_of_folder(folder) == "qwen_image_edit"
  editor_2511 = pipeline.Editor.from_folder(folder, family="qwen_image_edit", max_sequence_length=MAX_LENGTH)
  assert editor_2511.family.transformer.cfg.zero_cond_t
  ref_x0, _, calls = run_reference(reference_pipeline(folder), images(two=True))
  cond = condition_of(editor_2511.family, images(two=True))
  graphdef, state = nnx.split(editor_2511.family.transformer)
  sampler = rollouts.Sampler(editor_2511.family, lambda s: nnx.merge(graphdef, s))
  x0, _, _ = rollouts.generate(sampler, state, cond, streams.row_keys(0, "edit", 0, 1), grid=GRID, num_steps=STEPS,
                               solver="euler", chunk=1, noise=noise())
  err = max_rel_err(x0, ref_x0)
  print(f"2511, two images: x0 max_rel_err {err:.2e} (bound {ROLLOUT_BOUND:.1e})")
  assert err <= ROLLOUT_BOUND
  ref_2509, _, _ = run_reference(qwen_edit_pipeline[1], images(two=True))
  assert max_rel_err(ref_x0, ref_2509) > 10 * ROLLOUT_BOUND  # the same weights as 2509: zero_cond_t matters


def test_true_cfg_equals_pipeline(qwen_edit_pipeline, editor, plain):  # noqa: F811
  ref_x0, ref_images, calls = run_reference(qwen_edit_pipeline[1], images(), cfg=CFG)
  check_condition(condition_of(editor.family, images(), guidance=CFG), calls, plain["sigmas"], [SOURCE])
  ours, rollout = edit(editor, guidance=CFG)
  err = max_rel_err(rollout.x0, ref_x0)
  print(f"true CFG {CFG}: x0 max_rel_err {err:.2e} (bound {CFG_BOUND:.1e})")
  assert err <= CFG_BOUND
  assert max_rel_err(to_unit(ours), ref_images) <= CFG_BOUND + DECODE_BOUND - TIMESTEP  # + the decoder's rounding
  assert max_rel_err(rollout.x0, plain["x0"]) > 10 * CFG_BOUND  # guidance changed the result


# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora(qwen_edit_pipeline, tmp_path_factory):  # noqa: F811
  """A trained-looking adapter of the family's transformer (every A and B drawn non-zero), exported as a diffusers
  LoRA file: (graphdef, adapters, base, file)."""
  family = fq.QwenImageEdit.from_folder(qwen_edit_pipeline[0], lora=LORA_SPEC, max_sequence_length=MAX_LENGTH)
  graphdef, adapters, base = qi.split_params(family.transformer)
  keys = iter(jax.random.split(jax.random.key(7), 1000))
  adapters = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(next(keys), a.shape), adapters)
  path = export.save_lora(adapters, LORA_SPEC, str(tmp_path_factory.mktemp("qwen_lora")), family.lora_weight_table)
  return graphdef, adapters, base, path


@pytest.fixture(scope="module")
def lora_pipe(qwen_edit_pipeline, lora):  # noqa: F811
  pipe = reference_pipeline(qwen_edit_pipeline[0])
  pipe.load_lora_weights(os.path.dirname(lora[3]))
  return pipe


def test_lora_file_loads_in_pipeline_and_equals_ours(qwen_edit_pipeline, lora, lora_pipe, plain):  # noqa: F811
  from safetensors import safe_open
  with safe_open(lora[3], "pt") as f:
    file_modules = {n.removeprefix("transformer.").rsplit(".lora_A", 1)[0] for n in f.keys() if ".lora_A." in n}
  adapted = {n for n, m in lora_pipe.transformer.named_modules() if hasattr(m, "lora_A") and m.lora_A}
  assert adapted == file_modules and len(adapted) == 2 * (8 + 1)  # every adapter of the file, in both blocks
  ref_x0, ref_images, _ = run_reference(lora_pipe, images())
  editor = pipeline.Editor.from_folder(qwen_edit_pipeline[0], family="qwen_image_edit", lora_weights=lora[3],
                                       max_sequence_length=MAX_LENGTH)
  ours, rollout = edit(editor)
  err = max_rel_err(rollout.x0, ref_x0)
  print(f"LoRA: x0 max_rel_err {err:.2e} (bound {ROLLOUT_BOUND:.1e})")
  assert err <= ROLLOUT_BOUND  # the rank-4 paths add two short reductions beside each adapted matmul
  assert max_rel_err(to_unit(ours), ref_images) <= DECODE_BOUND
  assert max_rel_err(rollout.x0, plain["x0"]) > 10 * ROLLOUT_BOUND  # the adapter matters


def test_merged_export_equals_lora(lora, lora_pipe, tmp_path):
  from diffusers import QwenImageTransformer2DModel
  graphdef, adapters, base, _ = lora
  model = nnx.merge(graphdef, adapters, base)
  folder = export.save_transformer(export.merge_adapters(adapters, base, LORA_SPEC), model.cfg,
                                   str(tmp_path / "transformer"), fq.QwenImageEdit.weight_table)
  merged = QwenImageTransformer2DModel.from_pretrained(folder).eval()
  inputs = make_inputs(ONE_REFERENCE, EXACT)
  width = model.cfg.joint_attention_dim  # the fixture's inputs are for a narrower text width
  inputs["encoder_hidden_states"] = np.random.default_rng(2).standard_normal(
      inputs["encoder_hidden_states"].shape[:2] + (width,)).astype(np.float32)
  ref = torch_forward(merged, inputs)
  # W + scale A B folded in float32 rounds once more per weight (eps), far under the forward's bound
  assert max_rel_err(np.asarray(model(**inputs)), ref) <= QWEN_IMAGE_BOUND
  assert max_rel_err(torch_forward(lora_pipe.transformer, inputs), ref) <= QWEN_IMAGE_BOUND  # peft's unmerged LoRA
  no_adapter = nnx.merge(graphdef, jax.tree.map(lambda a: 0 * a, adapters), base)
  assert max_rel_err(np.asarray(no_adapter(**inputs)), ref) > 1e-2  # the merge changed the weights


def test_launch_edit_with_two_images_without_torch(qwen_edit_pipeline, tmp_path):  # noqa: F811
  """launch/edit.py on a Qwen-Image-Edit folder (found by its model_index.json), two --image, in a fresh interpreter
  that must not import torch; the output takes the last image's size."""
  import os
  import subprocess
  import sys

  from PIL import Image
  first, second = images(two=True)
  paths = [tmp_path / "a.png", tmp_path / "b.png"]
  for image, path in zip((first, second), paths):
    image.save(path)
  out = tmp_path / "edited.png"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ("import sys, runpy\nsys.argv = sys.argv[1:]\ntry:\n  runpy.run_path(sys.argv[0], run_name='__main__')\n"
          "except SystemExit as e:\n  if e.code:\n    raise\n"
          "assert 'torch' not in sys.modules, 'the runtime imported torch'\nprint('torch not imported')")
  args = [f"--model={qwen_edit_pipeline[0]}", f"--image={paths[0]}", f"--image={paths[1]}",
          f"--instruction={INSTRUCTION}", f"--out={out}", "--steps=2", "--dtype=float32", "--noauto_resize"]
  env = dict(os.environ, PYTHONPATH=root, XLA_FLAGS="")
  result = subprocess.run([sys.executable, "-c", code, os.path.join(root, "launch", "edit.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "wrote" in result.stdout and "torch not imported" in result.stdout
  with Image.open(out) as img:
    assert img.size == second.size and img.mode == "RGB"
