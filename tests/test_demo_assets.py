"""The shipped world-demo assets (`python -m editr1_jax.demo.train_assets --train`): the dataset folder reads, the
editor folder loads through `Kontext.from_folder` and edits the held-out split partly right, the judge folder loads
through the reward's builder and ranks edits, and every weight file loads in diffusers / transformers without a
missing or unexpected tensor."""

import dataclasses
import os

import numpy as np
import pytest
from flax import nnx

from configs import base
from editr1_jax import images, reward, sampling
from editr1_jax.conditioning import tokenize_t5
from editr1_jax.data import folder as data_folder
from editr1_jax.demo import train_assets as ta
from editr1_jax.demo import world
from editr1_jax.families import base as family_base
from editr1_jax.families.kontext import Kontext

EDITOR, JUDGE = os.path.join(ta.ASSETS, "editor"), os.path.join(ta.ASSETS, "judge")
ITEMS = 32  # held-out items sampled or judged here (the shipped test split's first)


@pytest.fixture(scope="module")
def family():
  return Kontext.from_folder(EDITOR, max_sequence_length=ta.T5_MAX_LENGTH, chunk=ta.CHUNK)


@pytest.fixture(scope="module")
def held_out():
  records = data_folder.read_records(world.WORLD_DATA, "test")[:ITEMS]
  sources = [np.asarray(images.load_rgb(r.image_path)) for r in records]
  return records, sources, world.targets_for(records)


def test_dataset_folder_reads():
  train, test = (data_folder.read_records(world.WORLD_DATA, split) for split in ("train", "test"))
  assert len(train) >= 256 and len(test) == 64
  assert {r.category for r in train} == {r.category for r in test} == set(world.KINDS)
  assert len(world.targets_for(train)) == len(train)


def _runtime_free(cfg):
  return dataclasses.replace(cfg, dtype="float32", param_dtype="float32")


def test_editor_folder_loads_as_trained(family):
  assert family_base.family_of_folder(EDITOR) == "kontext"
  assert family.transformer.cfg.to_diffusers_config() == ta.EDITOR.to_diffusers_config()
  assert family.vae.cfg.replace(shift_factor=0.0, scaling_factor=1.0) == ta.VAE.replace(shift_factor=0.0,
                                                                                      scaling_factor=1.0)
  assert family.vae.cfg.scaling_factor > 0
  assert family.grid(world.SIZE, world.SIZE) == (4, 4)  # 8x downsampling, 2x2 packing: 16 tokens
  assert family.noise_shape((4, 4)) == (16, 4 * ta.VAE.latent_channels)
  assert family.text.t5.cfg.d_model == ta.EDITOR.joint_attention_dim
  assert family.text.clip.cfg.hidden_size == ta.EDITOR.pooled_projection_dim
  assert family.shift == sampling.ShiftConfig.from_diffusers_config(ta.SCHEDULER)
  prompts = [t for t in world.texts() if t.endswith(".") and len(t.split()) <= 10]  # the instructions
  ids = tokenize_t5(family.text.t5_tokenizer, prompts, ta.T5_MAX_LENGTH)
  assert (ids[:, -1] == family.text.t5_tokenizer.pad_token_id).all()  # every instruction fits, untruncated
  assert not (ids == family.text.t5_tokenizer.unk_token_id).any()


def test_tokenizers_are_the_written_ones(tmp_path):
  """The shipped tokenizer files are what `write_tokenizers` writes (deterministic), and every world instruction is
  whole words to T5."""
  ta.write_tokenizers(str(tmp_path))
  for sub, folder in (("tokenizer", EDITOR), ("tokenizer_2", EDITOR), ("judge", ta.ASSETS)):
    written = sorted(p.relative_to(tmp_path / sub) for p in (tmp_path / sub).rglob("*") if p.is_file())
    assert written
    for name in written:
      shipped = os.path.join(folder, sub, name)
      assert open(shipped, "rb").read() == (tmp_path / sub / name).read_bytes(), shipped


def test_vae_keeps_correct_edits_correct(family, held_out):
  """A correct edit decoded by the VAE passes the measure; an unchanged one still fails."""
  _, sources, targets = held_out
  decoded = ta.roundtrip(family.vae, targets + sources)
  kept = [world.edit_correct(s, d, t) for s, d, t in zip(sources, decoded[:ITEMS], targets)]
  assert np.mean(kept) >= 0.8
  assert not any(world.edit_correct(s, d, t) for s, d, t in zip(sources, decoded[ITEMS:], targets))


def test_editor_is_imperfect_but_edits(family, held_out):
  records, _, targets = held_out
  items = world.make_items(ITEMS, "test")
  assert [i.prompt for i in items] == [r.prompt for r in records]
  edits = ta.sample_edits(family, nnx.state(family.transformer), items, seed=0)
  correct = [world.edit_correct(world.draw(i.scene), e, t) for i, e, t in zip(items, edits, targets)]
  assert 0.1 <= np.mean(correct) <= 0.9


def test_judge_loads_through_the_reward_and_ranks_edits(held_out):
  records, sources, targets = held_out
  config = base.get_config()
  config.reward.kind, config.reward.tiny, config.reward.model_dir = "mllm", False, JUDGE
  config.reward.template_file = os.path.join(ta.ASSETS, "judge_prompt.txt")
  with open(config.reward.template_file) as f:
    assert f.read() == ta.JUDGE_TEMPLATE
  config.reward.dtype, config.reward.batch_size = "float32", 16
  built = reward.build(config)
  assert _runtime_free(built.judge.cfg) == _runtime_free(ta.judge_config(JUDGE))
  rows = [{"prompt": r.prompt, "requirement": r.requirement} for r in records]
  scored = built.score(sources + sources, targets + sources, rows + rows)
  assert scored.valid.all()
  right, unchanged = scored.scores[:ITEMS], scored.scores[ITEMS:]
  assert right.mean() > unchanged.mean() + 0.2
  assert np.mean(right > unchanged) >= 0.75


def test_folders_load_in_diffusers_and_transformers():
  """Every component's config and weights as the reference libraries read them: no tensor missing or left over."""
  import diffusers
  import transformers
  parts = [(diffusers.FluxTransformer2DModel, os.path.join(EDITOR, "transformer")),
           (diffusers.AutoencoderKL, os.path.join(EDITOR, "vae")),
           (transformers.CLIPTextModel, os.path.join(EDITOR, "text_encoder")),
           (transformers.T5EncoderModel, os.path.join(EDITOR, "text_encoder_2")),
           (transformers.Qwen2_5_VLForConditionalGeneration, JUDGE)]
  for cls, path in parts:
    _, info = cls.from_pretrained(path, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (path, info)


def test_demo_config_reads_the_assets_as_trained():
  """configs/demo.py repeats train_assets' sampler, guidance and T5 length (a config stays light to import): they
  must agree, or the editor reads features it was never trained on."""
  from configs import demo
  c = demo.get_config()
  assert (c.model.pipeline_dir, c.reward.model_dir) == (EDITOR, JUDGE)
  assert c.reward.template_file == os.path.join(ta.ASSETS, "judge_prompt.txt")
  assert c.data.t5_max_length == ta.T5_MAX_LENGTH
  for sampler, steps, guidance in ((c.rollout.sampler, c.rollout.num_steps, c.rollout.guidance),
                                   (c.rollout.eval_sampler, c.rollout.eval_steps, c.rollout.eval_guidance)):
    assert (sampler, steps, guidance) == (ta.SOLVER, ta.NUM_STEPS, ta.GUIDANCE)
