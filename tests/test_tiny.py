"""The demo's tiny models and shipped tokenizer files: reproducible from code, sized to each other."""

import json
import os

import numpy as np

from editr1_jax import latents, metrics, tiny
from editr1_jax.families import kontext
from editr1_jax.layers import LoraSpec
from editr1_jax.reward import mllm


def _model(path) -> dict:
  with open(path) as f:
    return json.load(f)["model"]


def test_shipped_tokenizers_are_what_write_assets_draws(tmp_path):
  tiny.write_assets(str(tmp_path))
  for sub in ("tokenizer", "judge"):  # BPE: the same vocabulary and merges, id for id
    shipped, drawn = _model(os.path.join(tiny.ASSETS, sub, "tokenizer.json")), _model(tmp_path / sub / "tokenizer.json")
    assert (shipped["vocab"], shipped["merges"]) == (drawn["vocab"], drawn["merges"]), sub
  # Unigram: the trainer is multithreaded, so scores wobble (measured up to 2e-5 relative) and ties may swap
  # order; the pieces are the same.
  shipped = dict(map(tuple, _model(os.path.join(tiny.ASSETS, "tokenizer_2", "tokenizer.json"))["vocab"]))
  drawn = dict(map(tuple, _model(tmp_path / "tokenizer_2" / "tokenizer.json")["vocab"]))
  assert shipped.keys() == drawn.keys()
  np.testing.assert_allclose([shipped[k] for k in shipped], [drawn[k] for k in shipped], rtol=1e-4)
  with open(os.path.join(tiny.ASSETS, "judge", "preprocessor_config.json")) as f:
    assert json.load(f) == json.loads((tmp_path / "judge" / "preprocessor_config.json").read_text())


def test_tiny_models_fit_together():
  """Prompts -> text conditioning -> one velocity of the tiny transformer -> decoded image -> judge score."""
  text = tiny.tiny_text_encoders(0, 16)
  hidden, pooled, txt_ids = text(["Make the square white.", "Change the background to red."])
  vae = tiny.tiny_vae(0)
  model = tiny.tiny_transformer(0, LoraSpec(rank=2, alpha=2.0, targets=("to_q",)))
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
  reference, ref_ids = latents.reference_latents(vae, images)
  h, w = images.shape[1] // 8, images.shape[2] // 8  # packed grid: VAE factor 4, then 2x2 patches
  noise = np.random.default_rng(1).standard_normal((2, h * w, model.cfg.in_channels)).astype(np.float32)
  cond = kontext.KontextCondition(reference=reference, text=hidden, pooled=pooled,
                                  guidance=np.full((2,), 2.5, np.float32),
                                  img_ids=np.concatenate([latents.target_ids(h, w), ref_ids]), txt_ids=txt_ids)
  velocity = np.asarray(kontext.velocity(model, noise, np.array([1.0, 0.5], np.float32), cond))
  assert velocity.shape == noise.shape and np.isfinite(velocity).all()
  edits = np.asarray(latents.decode_tokens(vae, velocity, 2 * h, 2 * w))
  assert edits.shape == images.shape
  judge = mllm.MllmJudge.tiny(0, batch_size=2)
  result = judge.score(list(metrics.to_uint8(images)), list(metrics.to_uint8(edits)),
                       ["Make the square white."] * 2, ["Only the square changes."] * 2)
  assert result.valid.all() and ((result.scores >= 0) & (result.scores <= 1)).all()
  np.testing.assert_allclose(result.probs.sum(-1), 1.0, rtol=1e-5)

