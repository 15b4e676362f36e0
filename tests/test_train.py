"""The training program on the tiny CPU config: a full run, exact resume, refused non-finite updates, export."""

import importlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import override
from PIL import Image

from editr1_jax import export, rollouts, train_loop
from editr1_jax.layers import LoraSpec
from editr1_jax.reward.base import RewardResult

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(name: str = "tiny", **overrides):
  """`configs/<name>.py`, shortened: 4 epochs of 2 groups of 4, checkpoints every 2, no evaluation."""
  c = importlib.import_module(f"configs.{name}").get_config()
  c.num_epochs = 4
  c.checkpoint_every = 2
  c.eval_every = 0
  c.log_images_every = 1
  c.data.groups_per_epoch, c.data.group_size = 2, 4
  return override(c, **overrides)


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves((state.params, state.old_params, state.ema_params, state.opt_state,
                                                  state.step))]


def lora_b_leaves(params) -> list:
  """The LoRA B leaves, picked by path (not by position in the flattened tree); an error if there is none, so a
  check over them cannot pass vacuously."""
  def named(path, name):
    return any(getattr(k, "key", getattr(k, "name", None)) == name for k in path)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  found = [x for path, x in leaves if named(path, "lora_b")]
  assert found, f"no lora_b leaf among {len(leaves)}: {[jax.tree_util.keystr(p) for p, _ in leaves[:4]]} ..."
  return found


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  trainer = train_loop.Trainer(tiny_config(), workdir)
  trainer.run()
  return trainer, workdir


def test_run_writes_checkpoints_logs_and_learns_nothing_silently(straight):
  trainer, workdir = straight
  assert trainer.epoch == 4 and int(trainer.state.step) == 4
  assert trainer.checkpoints.all_epochs() == [2, 4]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  assert sorted(os.listdir(os.path.join(workdir, "images"))) == [f"rollouts_{e:05d}.png" for e in (1, 2, 3, 4)]
  # the adapter moved away from its zero-initialised B, and old / EMA follow it
  assert any(np.abs(np.asarray(p)).max() > 0 for p in lora_b_leaves(trainer.state.params))


def test_resume_is_bit_identical(straight, tmp_path):
  """A new process resuming from the straight run's epoch-2 checkpoint ends where the straight run ended."""
  workdir = tmp_path / "resumed"
  shutil.copytree(straight[1], workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  resumed = train_loop.Trainer(tiny_config(), str(workdir))  # a new process would do exactly this
  assert resumed.epoch == 2
  resumed.run(stop_after=1)
  assert resumed.epoch == 3
  resumed.run()
  for a, b in zip(_leaves(resumed.state), _leaves(straight[0].state)):
    np.testing.assert_array_equal(a, b)


class FixedReward:
  """A reward of the registry's protocol that says what the test wants."""

  def __init__(self, scores, valid):
    self.scores, self.valid = scores, valid

  def score(self, sources, edits, records, *, progress=None):
    n = len(records)
    return RewardResult(np.resize(np.float32(self.scores), n), None, np.resize(self.valid, n))


class RolloutsOnBase(rollouts.Sampler):
  """Samples with the given base weights whatever the trainer passes (its own base is broken in the test)."""

  def __init__(self, sampler, base):
    super().__init__(sampler.family, sampler.model_fn, noise_level=sampler.noise_level)
    self.base = base

  def __call__(self, states, *args, **kw):
    return super().__call__((states[0], self.base), *args, **kw)


def test_non_finite_updates_are_refused_then_stop_the_run(tmp_path):
  trainer = train_loop.Trainer(tiny_config(max_nonfinite_updates=2), str(tmp_path))
  before = _leaves(trainer.state)
  # finite rollouts and rewards, but a NaN base network in training: every gradient is NaN
  trainer.rollout_sampler = RolloutsOnBase(trainer.rollout_sampler, trainer.frozen)
  trainer.frozen = jax.tree.map(lambda x: x * np.nan, trainer.frozen)
  trainer.reward = FixedReward([0.5, 1.5], True)
  trainer.run_epoch()
  assert trainer.nonfinite_streak == 1
  after = _leaves(trainer.state)
  for a, b in zip(after[:2], before[:2]):  # params and old params untouched
    np.testing.assert_array_equal(a, b)
  with pytest.raises(train_loop.NonFiniteError, match="2 consecutive non-finite updates"):
    trainer.run_epoch()


def test_non_finite_edits_are_masked_not_judged(straight):
  trainer, _ = straight
  records = [{"prompt": "Make the square red.", "requirement": "Only the square changes."}] * 3
  images = np.random.default_rng(0).uniform(-1, 1, (3, 64, 64, 3)).astype(np.float32)
  edits = images.copy()
  edits[1, 5, 7, 0] = np.nan
  result = rollouts.Rollouts(x0=None, edits=edits, sources=images, cond=None, sigmas=None)
  scores, valid = rollouts.score(FixedReward([0.5], True), result, records)
  assert valid.tolist() == [True, False, True]
  assert np.isnan(scores[1]) and np.isfinite(scores[[0, 2]]).all()


def test_export_of_a_run(straight, tmp_path):
  trainer, workdir = straight
  written = export.export_run(workdir, str(tmp_path), weights="ema", merged=True)
  assert written == [str(tmp_path / export.LORA_FILE), str(tmp_path / "transformer")]
  from editr1_jax.models import flux
  spec = LoraSpec(rank=trainer.config.lora.rank, alpha=trainer.config.lora.alpha,
                  targets=tuple(trainer.config.lora.targets))
  model = flux.load_flux_transformer(str(tmp_path / "transformer"))
  lora_model = flux.load_flux_transformer(str(tmp_path / "transformer"), lora=spec, lora_weights=written[0])
  _, loaded, _ = flux.split_params(lora_model)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(trainer.state.ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the merged folder computes what the trained policy (base + EMA adapter) computes
  cfg = model.cfg
  rng = np.random.default_rng(0)
  ids = np.concatenate([np.zeros((6, 3)), np.stack([np.ones(6), np.arange(6) // 3, np.arange(6) % 3], -1)])
  inputs = dict(hidden_states=rng.standard_normal((2, 12, cfg.in_channels), np.float32),
                encoder_hidden_states=rng.standard_normal((2, 5, cfg.joint_attention_dim), np.float32),
                pooled_projections=rng.standard_normal((2, cfg.pooled_projection_dim), np.float32),
                timestep=np.array([1e-3, 2e-3], np.float32), guidance=np.array([2.5e-3, 2.5e-3], np.float32),
                img_ids=ids.astype(np.float32), txt_ids=np.zeros((5, 3), np.float32))
  trained = trainer.policy.model(trainer.state.ema_params, trainer.frozen)
  np.testing.assert_allclose(np.asarray(model(**inputs)), np.asarray(trained(**inputs)), rtol=1e-5, atol=1e-5)


def test_train_cli_runs_the_demo(tmp_path):
  """`launch/train.py` as a user runs it (2 epochs of the tiny config, then export)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  run = subprocess.run([sys.executable, "launch/train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                        "--config.num_epochs=2", "--config.eval_every=1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "epoch 2/2 | reward" in run.stdout
  assert "epoch 0/2 | eval reward" in run.stdout  # the starting weights are evaluated, as the public run does
  grid = Image.open(tmp_path / "images" / "before_after.png")  # source | epoch 0 | epoch 2 of the same items
  assert grid.format == "PNG" and min(grid.size) > 0
  out = subprocess.run([sys.executable, "launch/export.py", f"--workdir={tmp_path}", f"--out={tmp_path}/export"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert os.path.isfile(tmp_path / "export" / export.LORA_FILE)


# ---------------------------------------------------------------------------------------------------------------
# A run's state under faults: damaged checkpoints, changed config, changed data, failing evaluation, a dead judge.

def _copy_run(straight, tmp_path, name="copy"):
  dst = tmp_path / name
  shutil.copytree(straight[1], dst)
  return dst


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(max(os.path.getsize(path) // 2, 1))


def _largest_state_file(checkpoint):
  files = [os.path.join(d, f) for d, _, fs in os.walk(checkpoint / "state") for f in fs]
  return max(files, key=os.path.getsize)


def test_damaged_newest_checkpoint_is_set_aside_and_training_falls_back(straight, tmp_path, caplog):
  workdir = _copy_run(straight, tmp_path)
  damaged = _largest_state_file(workdir / "checkpoints" / "4")
  _truncate(damaged)
  with caplog.at_level("WARNING"):
    trainer = train_loop.Trainer(tiny_config(), str(workdir))
  assert trainer.epoch == 2 and int(trainer.state.step) == 2
  name = os.path.relpath(damaged, workdir / "checkpoints" / "4")
  assert any(f"checkpoints/4: {name} has" in r.message for r in caplog.records), caplog.text
  assert os.path.isdir(workdir / "checkpoints" / "4.damaged")  # kept, renamed, never deleted
  assert trainer.checkpoints.all_epochs() == [2]


def test_export_of_a_damaged_checkpoint_names_the_intact_epochs(straight, tmp_path):
  workdir = _copy_run(straight, tmp_path)
  _truncate(workdir / "checkpoints" / "4" / "meta" / "metadata")
  with pytest.raises(FileNotFoundError, match=r"cannot export epoch 4: .*meta/metadata has .*intact epochs: \[2\]"):
    export.export_run(str(workdir), str(tmp_path / "out"))
  assert export.export_run(str(workdir), str(tmp_path / "out"), epoch=2)


def test_resume_with_a_config_that_changes_the_state_lists_every_difference(straight, tmp_path):
  workdir = _copy_run(straight, tmp_path)
  with pytest.raises(train_loop.ResumeError) as e:
    train_loop.Trainer(tiny_config(**{"seed": 1, "lora.rank": 8, "data.group_size": 2, "num_epochs": 6}),
                       str(workdir))
  message = str(e.value)
  for line in ("config.seed: saved 0, now 1", "config.lora.rank: saved 4, now 8", "config.data.group_size: saved 4"):
    assert line in message
  assert "num_epochs" not in message  # safe to change


def test_resume_on_changed_data_is_refused_unless_accepted(straight, tmp_path):
  workdir = _copy_run(straight, tmp_path)
  data = tmp_path / "data"
  shutil.copytree(tiny_config().data.dataset_dir, data)
  Image.new("RGB", (64, 64), (1, 2, 3)).save(data / "images" / "train_003.png")
  with pytest.raises(train_loop.ResumeError, match=r"1 file\(s\) changed: images/train_003.png"):
    train_loop.Trainer(tiny_config(**{"data.dataset_dir": str(data)}), str(workdir))
  trainer = train_loop.Trainer(tiny_config(**{"data.dataset_dir": str(data), "data.accept_changed_data": True,
                                              "num_epochs": 6, "eval_every": 3}), str(workdir))
  assert trainer.epoch == 4


def test_a_checkpoint_without_a_data_fingerprint_needs_the_flag(straight, tmp_path):
  """A checkpoint from before fingerprints (or with a damaged one) is not resumed on unknown data silently."""
  workdir = _copy_run(straight, tmp_path)
  meta_path = workdir / "checkpoints" / "4" / "meta" / "metadata"
  meta = json.loads(meta_path.read_text())
  del meta["data"]
  meta_path.write_text(json.dumps(meta))
  os.remove(workdir / "checkpoints" / "4" / "editr1_manifest.json")  # as an older version saved it
  with pytest.raises(train_loop.ResumeError, match="(?s)no \\(readable\\) fingerprint.*accept_changed_data=True"):
    train_loop.Trainer(tiny_config(), str(workdir))


def test_a_failing_evaluation_costs_no_training(tmp_path, monkeypatch):
  trainer = train_loop.Trainer(tiny_config(eval_every=1, checkpoint_every=5, eval_before_training=False),
                               str(tmp_path))

  def broken():
    raise RuntimeError("judge crashed")
  monkeypatch.setattr(trainer, "evaluate", broken)
  with pytest.raises(RuntimeError, match="judge crashed"):
    trainer.run()
  assert trainer.checkpoints.all_epochs() == [1]


def test_a_judge_without_valid_scores_stops_the_run_after_saving(tmp_path):
  trainer = train_loop.Trainer(tiny_config(max_invalid_reward_epochs=2, checkpoint_every=5), str(tmp_path))
  trainer.reward = FixedReward([np.nan], False)
  trainer.run_epoch()
  assert trainer.invalid_streak == 1
  with pytest.raises(train_loop.RewardError, match="2 consecutive epochs without one valid reward"):
    trainer.run_epoch()
  assert trainer.checkpoints.all_epochs() == [2]


def test_evaluation_with_a_benchmark_protocol(tmp_path, qwen_reference):
  """config.eval_benchmark: the EMA policy's edits of a held-out ImgEdit set (its items named in the GitHub layout)
  judged by generation at the configured pixel bounds; the benchmark's overall (here NaN: the tiny judge's answers are
  unparseable, and counted) is an eval metric, and summary.json says how the items were judged."""
  from editr1_jax.bench import imgedit, mini
  bench = mini.write(str(tmp_path / "mini"), per_category=1)
  trainer = train_loop.Trainer(tiny_config(**{
      "eval_benchmark": "imgedit", "eval_benchmark_dir": str(tmp_path / "mini" / "imgedit"),
      "eval_benchmark_items": os.path.join(bench.imgedit_github, "basic_edit.json"),
      "eval_judge_dir": qwen_reference[1],
      "eval_judge_max_new_tokens": 4, "eval_judge_max_pixels": 6272, "reward.batch_size": 3}), str(tmp_path / "run"))
  scores = trainer.evaluate()
  # 4 new tokens cannot hold the three "<criterion>: <1..5>" lines: every one of the 9 items (one per edit type)
  # is unparseable, so no item is scored and the overall is NaN
  assert scores["eval/imgedit/all/unparseable"] == 9 and np.isnan(scores["eval/imgedit/all/score"])
  assert {"eval/reward_mean", "eval/imgedit/all/score"} <= set(scores)
  done = tmp_path / "run" / "eval" / "imgedit" / "00000"
  assert (done / "summary.json").is_file() and len((done / "results.jsonl").read_text().splitlines()) == 9
  report = json.loads((done / "summary.json").read_text())
  summary = report["summaries"]["all"]
  assert summary["n"] == summary["n_unparseable"] == 9
  judged = report["settings"]["judge"]
  assert (judged["max_pixels"], judged["max_new_tokens"], report["settings"]["editor"]["epoch"]) == (6272, 4, 0)
  assert {c: (v["n"], v["n_unparseable"]) for c, v in summary["categories"].items()} == {
      c: (1, 1) for c in imgedit.EDIT_TYPES}


def _scripted_answer(prompt: str) -> str:
  """A judge answer that always parses: every ImgEdit criterion name, the i-th (sorted) scored
  1 + (len(prompt) + i) % 5, so the scores depend on the item's query."""
  from editr1_jax.bench import imgedit
  names = sorted({c for criteria in imgedit.CRITERIA.values() for c in criteria})
  return "\n".join(f"{name}: {1 + (len(prompt) + i) % 5}" for i, name in enumerate(names))


def test_evaluation_with_a_judge_whose_answers_parse(tmp_path, qwen_reference, monkeypatch):
  """The benchmark in training with a scripted judge (the tiny judge's generation replaced by answers that parse):
  each item's score, each edit type's and the overall come out as the protocol computes them from those answers."""
  import math

  from editr1_jax.bench import imgedit, mini
  from editr1_jax.bench.judge import QwenJudge
  mini.write(str(tmp_path / "mini"), per_category=1)
  folder = str(tmp_path / "mini" / "imgedit")
  monkeypatch.setattr(QwenJudge, "answer", lambda self, requests: [_scripted_answer(r[0]) for r in requests])
  trainer = train_loop.Trainer(tiny_config(**{"eval_benchmark": "imgedit", "eval_benchmark_dir": folder,
                                              "eval_judge_dir": qwen_reference[1], "reward.batch_size": 3}),
                               str(tmp_path / "run"))
  scores = trainer.evaluate()
  prompts, names = imgedit.load_prompts(folder), sorted({c for cs in imgedit.CRITERIA.values() for c in cs})
  expected = {}
  for item in imgedit.read(folder):
    prompt = prompts.prompt(item.edit_type, item.instruction)
    values = [1 + (len(prompt) + names.index(c)) % 5 for c in imgedit.CRITERIA[item.edit_type]]
    expected[item.id] = (item.edit_type, values)
  done = tmp_path / "run" / "eval" / "imgedit" / "00000"
  results = {r["id"]: r for r in map(json.loads, (done / "results.jsonl").read_text().splitlines())}
  assert {k: (r["category"], r["subscores"]["score"]) for k, r in results.items()} == expected
  assert scores["eval/imgedit/all/unparseable"] == 0
  by_type = {t: np.mean(v) for t, v in expected.values()}  # one item per type
  assert len(set(by_type.values())) > 1  # the types differ, so a mixed-up mapping would show
  overall = math.fsum(by_type.values()) / len(by_type)
  assert scores["eval/imgedit/all/score"] == pytest.approx(overall, rel=1e-12)
  summary = json.loads((done / "summary.json").read_text())["summaries"]["all"]
  assert {c: v["means"]["score"] for c, v in summary["categories"].items()} == pytest.approx(by_type, rel=1e-12)
  assert summary["overall"]["score"] == pytest.approx(overall, rel=1e-12) and summary["n_unparseable"] == 0
