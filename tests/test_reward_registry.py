"""Rewards as plug-ins: the registry keyed by `config.reward.kind`, both shipped rewards through the one
`Reward` protocol, an unknown kind, a reward added by registration alone, and the colour reward on uint8."""

import numpy as np
import pytest

from configs import tiny as tiny_config
from editr1_jax import metrics
from editr1_jax import sharding as shd
from editr1_jax.reward import REWARDS, Reward, RewardResult, build, kinds, mllm, register
from editr1_jax.reward.colour import ColourReward, colour_scores

INSTRUCTIONS = ("Make the square red.", "Turn the circle blue", "Paint the triangle yellow, then green.")


def tiny(kind: str):
  config = tiny_config.get_config()
  config.reward.kind = kind
  return config


def pairs(n: int = 3, size: int = 64, seed: int = 0):
  rng = np.random.default_rng(seed)
  sources = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
  edits = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
  records = [{"prompt": INSTRUCTIONS[i % len(INSTRUCTIONS)], "requirement": "Keep the background." if i % 2 else "",
              "category": "color", "id": i} for i in range(n)]
  return sources, edits, records


def test_registry_lists_both_kinds():
  assert {"colour", "mllm"} <= set(REWARDS)
  assert kinds() == tuple(sorted(REWARDS))


@pytest.mark.parametrize("kind,num_probs", [("colour", None), ("mllm", 6)])
def test_build_each_kind_on_the_tiny_config(kind, num_probs):
  reward = build(tiny(kind), shd.make_mesh((-1, 1, 1)), shd.DEFAULT_RULES)
  assert isinstance(reward, Reward)
  result = reward.score(*pairs(), progress=None)
  assert isinstance(result, RewardResult)
  assert result.scores.shape == (3,) and result.scores.dtype == np.float32
  assert result.valid.shape == (3,) and result.valid.dtype == bool and result.valid.all()
  assert np.isfinite(result.scores).all() and ((result.scores >= 0) & (result.scores <= 1)).all()
  if num_probs is None:
    assert result.probs is None
  else:
    assert result.probs.shape == (3, num_probs) and result.probs.dtype == np.float32


def test_mllm_reward_reads_prompt_and_requirement_from_the_records():
  reward = build(tiny("mllm"))  # no mesh: the judge unplaced, default rules
  assert isinstance(reward, mllm.MllmReward)
  sources, edits, records = pairs()
  direct = reward.judge.score(sources, edits, [r["prompt"] for r in records], [r["requirement"] for r in records])
  np.testing.assert_array_equal(reward.score(sources, edits, records).scores, direct.scores)


def test_unknown_kind_is_an_error_naming_the_field_and_the_kinds():
  with pytest.raises(ValueError, match=r"config\.reward\.kind = 'nope'") as e:
    build(tiny("nope"))
  assert all(repr(k) in str(e.value) for k in ("colour", "mllm"))


class Toy:
  """A reward defined outside the package: the mean red channel, any instruction."""

  def __init__(self, config, mesh, rules):
    self.offset = float(config.seed)

  def score(self, sources, edits, records, *, progress=None):
    scores = np.asarray([e[..., 0].mean() / 255.0 + self.offset for e in edits], np.float32)
    return RewardResult(scores, None, np.isfinite(scores))


@pytest.fixture
def toy_registered():
  register("toy")(Toy)
  yield
  REWARDS.pop("toy", None)


def test_a_registered_reward_is_built_by_kind(toy_registered):
  reward = build(tiny("toy"))
  assert isinstance(reward, Toy) and isinstance(reward, Reward)
  sources, edits, records = pairs()
  result = reward.score(sources, edits, records)
  np.testing.assert_allclose(result.scores, [e[..., 0].mean() / 255.0 for e in edits], rtol=1e-6)
  assert "toy" in kinds()


def test_a_kind_cannot_be_registered_twice(toy_registered):
  with pytest.raises(ValueError, match="'toy' is already registered"):
    register("toy")(lambda config, mesh, rules: None)
  register("toy")(Toy)  # the same builder again (a re-import) is fine


def test_colour_on_uint8_equals_colour_scores_on_the_float_images():
  rng = np.random.default_rng(1)
  floats = np.clip(rng.normal(0.0, 0.6, (3, 32, 48, 3)), -1, 1).astype(np.float32)
  floats[1] = np.clip(floats[1] * 0.2 + np.asarray([0.7, -0.7, -0.7]), -1, 1)  # near red: a high score
  u8 = metrics.to_uint8(floats)
  _, _, records = pairs()
  result = ColourReward().score(list(u8), list(u8), records)
  expected = colour_scores(floats, [r["prompt"] for r in records])
  assert result.probs is None and result.valid.all()
  np.testing.assert_allclose(result.scores, expected, rtol=1 / 255)
  # exactly the formula on the uint8 images read back as x / 127.5 - 1
  np.testing.assert_allclose(result.scores, colour_scores(u8 / 127.5 - 1, [r["prompt"] for r in records]), rtol=1e-6)


def test_colour_scores_worked_out_by_hand():
  """Solid images, whose mean is their one colour: score = 1 - |rgb - named rgb| / (sqrt(3) * 255)."""
  # red is (220, 40, 40) in make_demo.COLOURS, black (20, 20, 20).
  # - solid (220, 40, 40), "red": distance 0 -> 1.
  # - solid (0, 0, 0), "red": distance sqrt(220^2 + 40^2 + 40^2) = sqrt(51600); / (sqrt(3) * 255) =
  #   sqrt(51600 / 195075) = sqrt(688 / 2601) = sqrt(688) / 51 = 4 sqrt(43) / 51 -> 1 - 4 sqrt(43) / 51 = 0.48569...
  # - solid (255, 255, 255), "black": distance 235 sqrt(3) -> 1 - 235 / 255 = 4 / 51.
  # - solid (0, 0, 0), "black": distance 20 sqrt(3) -> 1 - 20 / 255 = 47 / 51.
  rgbs = [(220, 40, 40), (0, 0, 0), (255, 255, 255), (0, 0, 0)]
  prompts = ["Make the square red.", "Make the square red.", "Turn the circle black", "Turn the circle black"]
  expected = [1.0, 1.0 - 4.0 * np.sqrt(43.0) / 51.0, 4.0 / 51.0, 47.0 / 51.0]
  u8 = [np.broadcast_to(np.asarray(rgb, np.uint8), (8, 12, 3)).copy() for rgb in rgbs]
  result = ColourReward().score(u8, u8, [{"prompt": p} for p in prompts])
  assert result.valid.all() and result.probs is None
  # float32 scores: a few ulps of rounding (read-back x / 127.5 - 1, mean, float32 cast), far below any change
  # of the formula
  np.testing.assert_allclose(result.scores, expected, rtol=0, atol=1e-6)
  floats = np.stack(u8) / 127.5 - 1.0
  np.testing.assert_allclose(colour_scores(floats, prompts), expected, rtol=0, atol=1e-12)


def test_colour_errors():
  sources, edits, records = pairs()
  reward = ColourReward()
  with pytest.raises(ValueError, match="names none of the colours"):
    reward.score(sources, edits, [dict(records[0], prompt="Remove the cat.")] + records[1:])
  with pytest.raises(ValueError, match="edit 1: expected a uint8"):
    reward.score(sources, [edits[0], edits[1] / 127.5 - 1, edits[2]], records)
  with pytest.raises(ValueError, match="must pair up"):
    reward.score(sources, edits[:2], records)


def test_reward_result_shapes_must_agree():
  with pytest.raises(ValueError, match="same first axis"):
    RewardResult(np.zeros(3, np.float32), np.zeros((2, 6), np.float32), np.ones(3, bool))
  assert RewardResult(np.asarray([np.nan, 0.5], np.float32), None, np.asarray([False, True])).num_invalid == 1
