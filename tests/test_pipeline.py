"""Editing with the Kontext family against diffusers' FluxKontextPipeline on a tiny pipeline folder written here."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import float32_bound, max_rel_err, perturb_
from PIL import Image
from test_autoencoder import save_reference as save_vae

from editr1_jax import export, pipeline, sampling
from editr1_jax.families import base as family_base
from editr1_jax import sharding as shd
from editr1_jax import weights as wio
from editr1_jax.layers import LoraSpec
from editr1_jax.models import flux

# The tiny VAE has 4 latent channels (16-wide packed tokens) and downsamples by 4; the text fixtures'
# T5 and CLIP both have width 32.
TRANSFORMER = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
SCHEDULER = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, shift=3.0,
                 use_dynamic_shifting=True)
HEIGHT, WIDTH = 32, 48  # multiples of 16: both pipelines keep the sources' size
GRID = (HEIGHT // 8, WIDTH // 8)  # packed target grid: (latent / 2)
PROMPTS = ["make the sky a deep orange sunset", "add a small cat sitting on the wooden table"]
STEPS = 4
# float32 rounding of a rollout's x0 (helpers.float32_bound): the VAE encodes the sources (61 reductions, the longest a
# GroupNorm over 32 x 48 x 8 / 4), then STEPS transformer calls (27 each, see test_nft); the decoder adds 79.
ROLLOUT_BOUND = float32_bound(HEIGHT * WIDTH * 8 // 4, depth=61 + STEPS * 27)  # 1.7e-4
DECODE_BOUND = float32_bound(HEIGHT * WIDTH * 8 // 4, depth=79)  # 1.2e-4


def sources():
  rng = np.random.default_rng(0)
  return [Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)) for _ in PROMPTS]


@pytest.fixture(scope="module")
def folder(text_pipeline):  # noqa: F811
  """A FluxKontextPipeline folder: the text fixtures plus a tiny transformer, VAE and FLUX's scheduler config."""
  from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
  root, parts = text_pipeline
  torch.manual_seed(0)
  transformer = FluxTransformer2DModel(**TRANSFORMER).eval()
  perturb_(transformer)
  transformer.save_pretrained(os.path.join(root, "transformer"))
  vae = save_vae(os.path.join(root, "vae"))
  scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
  scheduler.save_pretrained(os.path.join(root, "scheduler"))
  reference = FluxKontextPipeline(scheduler=scheduler, vae=vae, transformer=transformer, **parts)
  with open(os.path.join(root, "model_index.json"), "w") as f:  # what save_pretrained writes first
    json.dump({"_class_name": "FluxKontextPipeline", "_diffusers_version": "0.42.1"}, f)
  return root, reference


@pytest.fixture(scope="module")
def ours(folder):
  return pipeline.Editor.from_folder(folder[0])


def noise():
  return np.random.default_rng(1).standard_normal((len(PROMPTS), GRID[0] * GRID[1], 16)).astype(np.float32)


def reference_run(reference, output_type):
  with torch.no_grad():
    return reference(image=sources(), prompt=PROMPTS, height=HEIGHT, width=WIDTH, max_area=HEIGHT * WIDTH,
                     _auto_resize=False, num_inference_steps=STEPS, guidance_scale=3.5,
                     latents=torch.from_numpy(noise()), output_type=output_type).images


def test_euler_rollout_equals_diffusers(folder, ours):
  ref = reference_run(folder[1], "latent").numpy()
  images, rollout = ours(sources(), PROMPTS, height=HEIGHT, width=WIDTH, max_area=HEIGHT * WIDTH, auto_resize=False,
                         num_steps=STEPS, guidance=3.5, noise=noise(), solver="euler")
  assert rollout.x0.shape == ref.shape == (2, GRID[0] * GRID[1], 16)
  assert max_rel_err(rollout.x0, ref) <= 1e-4  # measured 1.3e-5: real timesteps, see flux_fixtures.REAL
  np.testing.assert_allclose(rollout.sigmas, folder[1].scheduler.sigmas.numpy(), rtol=1e-6)
  # decoded images too: diffusers' "np" output is the decode mapped to [0, 1]
  ref_images = reference_run(folder[1], "np")
  assert images.shape == ref_images.shape == (2, HEIGHT, WIDTH, 3)
  # x0's error (above) passes the decoder about 1:1, and the decoder rounds on its own
  assert max_rel_err(np.clip(images / 2 + 0.5, 0, 1), ref_images) <= 1e-4 + DECODE_BOUND


def test_dpm2_seeded_rollouts(ours):
  a, ra = ours(sources(), PROMPTS, auto_resize=False, num_steps=STEPS, solver="dpm2", seed=3)
  b, rb = ours(sources()[:1], PROMPTS[:1], auto_resize=False, num_steps=STEPS, solver="dpm2", seed=3)
  assert np.isfinite(a).all() and a.shape == (2, HEIGHT, WIDTH, 3)
  # row 0's noise comes from (seed, row 0) alone: the same edit alone or in a batch
  np.testing.assert_allclose(ra.x0[:1], rb.x0, rtol=0, atol=ROLLOUT_BOUND * np.abs(rb.x0).max())  # batch 2 vs 1
  euler = ours(sources(), PROMPTS, auto_resize=False, num_steps=STEPS, solver="euler", seed=3)[1]
  assert max_rel_err(euler.x0, ra.x0) > 1e-3


def test_progress_ticks_once_per_step(ours):
  seen = []
  ours(sources()[:1], PROMPTS[:1], auto_resize=False, num_steps=STEPS, progress=lambda s: seen.append(float(s)))
  jax.effects_barrier()
  assert sorted(seen, reverse=True) == pytest.approx(list(sampling.shifted_sigmas(STEPS, GRID[0] * GRID[1])[:-1]))


def test_sharded_pipeline_equals_single_device(folder, ours):
  sharded = pipeline.Editor.from_folder(folder[0], mesh=shd.make_mesh((2, 2, 2)))
  _, a = sharded(sources(), PROMPTS, auto_resize=False, num_steps=STEPS, noise=noise())
  _, b = ours(sources(), PROMPTS, auto_resize=False, num_steps=STEPS, noise=noise())
  assert max_rel_err(a.x0, b.x0) <= ROLLOUT_BOUND  # sharded sums in another order: measured 2e-7


def test_lora_file_spec_and_load(folder, tmp_path):
  spec = LoraSpec(rank=4, alpha=8.0, targets=flux.DEFAULT_LORA_TARGETS)
  cfg = flux.FluxConfig.from_diffusers_config(TRANSFORMER, lora=spec)
  _, abstract, _ = flux.split_params(nnx.eval_shape(lambda: flux.FluxTransformer(cfg, rngs=nnx.Rngs(0))))
  adapters = jax.tree.map(lambda x: x + 0.1, flux.init_adapters(abstract, jax.random.key(0)))
  path = export.save_lora(adapters, spec, str(tmp_path / "with_metadata"))
  read = pipeline.lora_spec_of_file(path)
  assert (read.rank, read.alpha) == (4, 8.0)
  assert {"transformer_blocks.0.attn.to_out.0", "single_transformer_blocks.0.attn.to_q"} <= set(read.targets)
  model = pipeline.Editor.from_folder(folder[0], lora_weights=path).family.transformer
  np.testing.assert_array_equal(model.transformer_blocks.stacked.attn.to_q.lora_b[...],
                                adapters["transformer_blocks"]["stacked"]["attn"]["to_q"]["lora_b"][...])

  tensors, _ = export.lora_tensors(adapters, spec)
  bare = str(tmp_path / "bare.safetensors")
  wio.save_safetensors(tensors, bare)  # no metadata: the rank is in the shapes, the alpha is not
  with pytest.raises(ValueError, match="lora_alpha"):
    pipeline.lora_spec_of_file(bare)
  assert pipeline.lora_spec_of_file(bare, alpha=8.0).scale == 2.0


def test_errors_name_the_problem(folder, ours, tmp_path):
  with pytest.raises(ValueError, match="instructions"):
    ours.family.condition(np.zeros((2, HEIGHT, WIDTH, 3), np.float32), PROMPTS[:1], grid=GRID, guidance=3.5)
  with pytest.raises(ValueError, match="different sizes"):
    ours([sources()[0], sources()[1].resize((64, 32))], PROMPTS, auto_resize=False)
  with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
    family_base.scheduler_shift(str(tmp_path))
  os.makedirs(tmp_path / "scheduler")
  with open(tmp_path / "scheduler" / "scheduler_config.json", "w") as f:
    json.dump({"use_dynamic_shifting": True, "use_karras_sigmas": True}, f)
  with pytest.raises(ValueError, match="scheduler_config.json.*use_karras_sigmas"):
    family_base.scheduler_shift(str(tmp_path))


def test_launch_edit_writes_the_image_without_torch(folder, tmp_path):
  """launch/edit.py end to end in a fresh interpreter that must not import torch."""
  import subprocess
  import sys
  src = tmp_path / "in.png"
  sources()[0].save(src)
  out = tmp_path / "out" / "edited.png"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ("import sys, runpy\nsys.argv = sys.argv[1:]\ntry:\n  runpy.run_path(sys.argv[0], run_name='__main__')\n"
          "except SystemExit as e:  # absl's app.run exits\n  if e.code:\n    raise\n"
          "assert 'torch' not in sys.modules, 'the runtime imported torch'\nprint('torch not imported')")
  script = os.path.join(root, "launch", "edit.py")
  args = [f"--model={folder[0]}", f"--image={src}", "--instruction=make the sky a deep orange sunset",
          f"--out={out}", "--steps=2", "--dtype=float32", "--sampler=dpm2", "--noauto_resize"]
  env = dict(os.environ, PYTHONPATH=root, XLA_FLAGS="")
  result = subprocess.run([sys.executable, "-c", code, script, *args], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "wrote" in result.stdout and "torch not imported" in result.stdout
  with Image.open(out) as img:
    assert img.size == (WIDTH, HEIGHT) and img.mode == "RGB"


# --------------------------------------------------------------------------------------------------
def test_a_16_bit_source_is_edited_as_its_8_bit_grey(ours, tmp_path):
  """A 16-bit PNG of 32768 is mid-grey (128), not the white PIL's own conversion makes of it."""
  Image.fromarray(np.full((HEIGHT, WIDTH), 32768, np.uint16)).save(tmp_path / "grey16.png")
  grey = Image.new("RGB", (WIDTH, HEIGHT), (128, 128, 128))
  edited = [ours([source], PROMPTS[:1], num_steps=2, auto_resize=False)[0]
            for source in (str(tmp_path / "grey16.png"), grey)]
  np.testing.assert_array_equal(edited[0], edited[1])


def test_truncation_warning_names_the_instruction(ours, caplog):
  long = "make the sky a deep orange sunset " * 40
  with caplog.at_level("WARNING", logger="editr1_jax.conditioning"):
    ours.family.text.tokenize(["add a cat", long])
  start = json.dumps(long[:40] + "...")
  assert f"T5: 1 prompt(s) truncated to {ours.family.text.max_sequence_length} tokens: {start}" in caplog.text
  assert "add a cat" not in caplog.text


def _run_edit(*args, **replace):
  """launch/edit.py in a fresh interpreter with `args` as flags (`replace` overrides or drops, with None)."""
  import subprocess
  import sys
  flags = dict(arg.split("=", 1) for arg in args)
  flags.update(replace)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  argv = [f"{k}={x}" for k, v in flags.items() if v is not None for x in (v if isinstance(v, list) else [v])]
  return subprocess.run([sys.executable, os.path.join(root, "launch", "edit.py"), *argv], capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("replace,error", [
    ({"--model": "{tmp}/no_model"}, "error: --model: {tmp}/no_model is not a folder"),
    ({"--model": "{tmp}"}, "error: --model: {tmp}/model_index.json: config file not found"),
    ({"--model": "{tmp}/other"}, "error: --model: {tmp}/other/model_index.json: _class_name 'FluxPipeline' is not a "
                                 "pipeline of a registered family"),
    ({"--image": ["{tmp}/in.png", "{tmp}/in.png"]}, "error: --image: 2 given; the kontext family takes 1 to 1"),
    ({"--image": "{tmp}/none.png"}, "error: --image: {tmp}/none.png: image not found"),
    ({"--image": "{tmp}/garbage.png"}, "error: --image: {tmp}/garbage.png: unreadable image"),
    ({"--image": "{tmp}/lab.tif"}, "error: --image: {tmp}/lab.tif: image mode LAB is not supported"),
    ({"--lora": "{tmp}/none.safetensors"}, "error: --lora: {tmp}/none.safetensors not found"),
    ({"--instruction": "  "}, "error: --instruction is empty"),
    ({"--out": "{tmp}/out/edited"}, "error: --out: {tmp}/out/edited has no image extension PIL can write"),
    ({"--out": "{tmp}/out/edited.xyz"}, "error: --out: {tmp}/out/edited.xyz has no image extension PIL can write"),
    ({"--out": "{tmp}/out/edited.xbm"}, "error: --out: PIL cannot write an RGB image as XBM"),
    ({"--out": "{tmp}/folder.png"}, "error: --out: {tmp}/folder.png is a folder"),
    ({"--out": "{tmp}/in.png/edited.png"}, "error: --out: cannot write under {tmp}/in.png"),
    ({"--steps": "0"}, "error: --steps must be >= 1, got 0"),
    ({"--guidance": "-1"}, "error: --guidance must be a finite number >= 0, got -1.0"),
    ({"--guidance": "nan"}, "error: --guidance must be a finite number >= 0, got nan"),
])
def test_launch_edit_refuses_bad_arguments_before_loading(tmp_path, replace, error):
  """A model folder with only its model_index.json: a check that came after loading would fail on the folder, not on
  the flag."""
  for name, pipeline_class in (("model", "FluxKontextPipeline"), ("other", "FluxPipeline")):
    (tmp_path / name).mkdir()
    (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
  (tmp_path / "folder.png").mkdir()
  (tmp_path / "garbage.png").write_bytes(b"not an image")
  Image.new("LAB", (16, 16)).save(tmp_path / "lab.tif")
  sources()[0].save(tmp_path / "in.png")
  replace = {k: [x.format(tmp=tmp_path) for x in v] if isinstance(v, list) else v.format(tmp=tmp_path)
             for k, v in replace.items()}
  result = _run_edit(f"--model={tmp_path / 'model'}", f"--image={tmp_path / 'in.png'}", "--instruction=make it red",
                     f"--out={tmp_path / 'out' / 'edited.png'}", **replace)
  lines = result.stderr.strip().splitlines()
  assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith(error.format(tmp=tmp_path)), lines
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("benchmark,items,subset", [("imgedit", 9, "all"), ("gedit", 22, "en")])
def test_launch_evaluate_samples_judges_and_resumes(folder, qwen_reference, tmp_path, benchmark, items, subset):
  """launch/evaluate.py end to end on a mini-benchmark (one item per category; GEdit in two languages, ImgEdit in its
  GitHub layout: --items names basic_edit.json, its prompts.json found beside it) with the tiny editor and a tiny
  judge (its random answers are unparseable: counted, never scored); a second run reuses every edit and judgment and
  compares with the first run's upstream per-item files."""
  import subprocess
  import sys

  from editr1_jax.bench import interop, mini
  bench = mini.write(str(tmp_path / "mini"), per_category=1)
  out = tmp_path / "out"
  where = ([f"--data={bench.gedit}", f"--prompts={bench.gedit_prompts}"] if benchmark == "gedit" else
           [f"--data={bench.imgedit}", f"--items={os.path.join(bench.imgedit_github, 'basic_edit.json')}"])
  command = [sys.executable, "launch/evaluate.py", f"--benchmark={benchmark}", *where,
             f"--model={folder[0]}", f"--judge={qwen_reference[1]}", f"--out={out}", "--steps=2", "--batch_size=3",
             "--max_new_tokens=4", "--dtype=float32", "--noauto_resize", f"--reward_model={qwen_reference[1]}",
             "--judge_max_pixels=6272"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  first = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  edits = [os.path.join(d, f) for d, _, fs in os.walk(out / "edits") for f in fs]
  assert len(results) == len(edits) == items
  report = json.loads((out / "summary.json").read_text())
  summary = report["summaries"][subset]
  assert summary["n_unparseable"] == sum(not r["parsed"] for r in results if r["language"] == subset or
                                         subset == "all")
  if benchmark == "gedit":  # both of GEdit-Bench's tables per language, in the file and on the console
    assert list(report["summaries"]) == ["en", "en_intersection", "cn", "cn_intersection"]
    assert "(en, intersection)" in first.stdout and "(cn, intersection)" in first.stdout
    model = os.path.basename(folder[0])
    upstream = [os.path.join(interop.gedit_folder(str(out), model), "qwen25vl", "eval_results_new",
                             f"{model}_{t}_gpt_score.csv") for t in ("color_alter", "tone_transfer")]
  else:
    upstream = [interop.imgedit_file(str(out))]
    assert len(json.loads(open(upstream[0]).read())) == items  # every answer, the unparseable ones too
  assert all(os.path.isfile(p) for p in upstream)
  judged = report["settings"]["judge"]  # how it was judged
  assert judged["folder"] == str(qwen_reference[1]) and judged["max_pixels"] == 6272
  assert judged["max_new_tokens"] == 4 and report["settings"]["editor"]["steps"] == 2
  reward = report["reward"]  # our logit score beside the judge's
  assert sum(c["n"] for c in reward["categories"].values()) == items and 0 <= reward["overall"] <= 1
  stamps = {p: os.stat(p).st_mtime_ns for p in edits}
  compare = os.path.dirname(upstream[0]) if benchmark == "gedit" else upstream[0]
  second = subprocess.run(command + [f"--compare={compare}"], cwd=root, capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert {p: os.stat(p).st_mtime_ns for p in edits} == stamps
  assert (out / "results.jsonl").read_text().count("\n") == items
  again = json.loads((out / "summary.json").read_text())
  assert again["summaries"][subset] == summary and again["compare"]["other"] == compare
