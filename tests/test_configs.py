"""Configs: the shipped ones load and validate; bad values are named; overrides work the ml-collections way."""

import importlib
import os
import re

import pytest

from editr1_jax import paths, run_config


def _load(name):
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", ["tiny", "tiny_qwen_image_edit", "tiny_qwen_image_edit_2511"])
def test_tiny_config_validates(name):
  run_config.validate(_load(name), num_devices=8)


def test_qwen_image_edit_2511_is_the_2509_run_on_2511(tmp_path):
  """Every setting the 2509 run's but the release, which a 2509 folder refuses (read from its transformer's
  config.json before any weight) and a Kontext run has none of."""
  c, old = _load("qwen_image_edit_2511"), _load("qwen_image_edit")
  assert c.model.release == "2511" and old.model.release == ""
  c.model.release = ""
  assert c.to_dict() == old.to_dict()
  tiny = _load("tiny_qwen_image_edit_2511")
  tiny.model.preset, tiny.model.pipeline_dir = "", str(tmp_path)
  (tmp_path / "transformer").mkdir()
  (tmp_path / "transformer" / "config.json").write_text('{"_class_name": "QwenImageTransformer2DModel"}')
  with pytest.raises(run_config.ConfigError, match=r"config.model.release = '2511', but config.model.pipeline_dir "
                                                   r"holds Qwen-Image-Edit-2509"):
    run_config.validate(tiny, num_devices=8)
  kontext = _load("tiny")
  kontext.model.release = "2511"
  with pytest.raises(run_config.ConfigError, match=r"config.model.release = '2511': the kontext family has no "):
    run_config.validate(kontext, num_devices=8)


def test_qwen_image_edit_config_is_the_public_run():
  """The Kontext run's settings on the Qwen-Image-Edit family, without CFG in rollouts."""
  c, k = _load("qwen_image_edit"), _load("kontext")
  assert c.model.family == "qwen_image_edit" and (c.rollout.guidance, c.rollout.eval_guidance) == (1.0, 1.0)
  assert (c.data.resolution, c.rollout.num_steps, c.rollout.sampler) == (512, 6, "dpm2")
  assert tuple(c.lora.targets) == tuple(k.lora.targets) and (c.lora.rank, c.lora.alpha) == (32, 64.0)
  assert (c.data.group_size, c.data.groups_per_epoch, c.filter.tau_mu, c.filter.tau_sigma) == (12, 24, 0.9, 0.05)
  with pytest.raises(run_config.ConfigError, match=r"config.model.pipeline_dir is empty"):
    run_config.validate(c, num_devices=8)
  c.data.text_max_length = 2048
  with pytest.raises(run_config.ConfigError, match=r"config.data.text_max_length = 2048"):
    run_config.validate(c, num_devices=8)


def test_kontext_config_is_the_paper_run():
  c = _load("kontext")
  assert (c.data.resolution, c.rollout.num_steps, c.rollout.sampler, c.rollout.guidance) == (512, 6, "dpm2", 2.5)
  assert (c.data.group_size, c.data.groups_per_epoch, c.lora.rank, c.lora.alpha) == (12, 24, 32, 64.0)
  assert (c.optim.learning_rate, c.nft.beta, c.nft.kl_weight, c.nft.old_policy_schedule) == (3e-4, 1.0, 1e-4, 1)
  assert (c.nft.ema_max_decay, c.filter.tau_mu, c.filter.tau_sigma) == (0.9, 0.9, 0.05)
  with pytest.raises(run_config.ConfigError, match=r"config.model.pipeline_dir is empty"):
    run_config.validate(c, num_devices=8)


@pytest.mark.parametrize("field,value,message", [
    ("rollout.sampler", "ddim", r"config.rollout.sampler = 'ddim'; expected one of"),
    ("num_epochs", 0, r"config.num_epochs = 0; expected an integer >= 1"),
    ("filter.tau_mu", 1.5, r"config.filter.tau_mu = 1.5; expected a finite number in \[0, 1\]"),
    ("data.group_size", 1, r"config.data.group_size = 1; expected an integer >= 2"),
    ("data.resolution", 72, r"config.data.resolution = 72; must be a multiple of 16"),
    ("data.dataset_dir", "/nonexistent", r"config.data.dataset_dir = '/nonexistent': folder not found"),
    ("mesh.shape", (3, 1, 1), r"config.mesh.shape = \(3, 1, 1\) does not fit 8 devices"),
    ("reward.template_file", "/nonexistent.txt", r"config.reward.template_file = '/nonexistent.txt': file not found"),
    ("optim.grad_clip", -1.0, r"config.optim.grad_clip = -1.0; expected a finite number > 0"),
    ("lora.alpha", -8.0, r"config.lora.alpha = -8.0; expected a finite number > 0"),
    ("optim.b2", 1.0, r"config.optim.b2 = 1.0; expected a finite number in \[0, 1\)"),
    ("optim.learning_rate", float("nan"), r"config.optim.learning_rate = nan; expected a finite number > 0"),
    ("rollout.guidance", float("inf"), r"config.rollout.guidance = inf; expected a finite number >= 0"),
    ("nft.timestep_fraction", 0.0, r"config.nft.timestep_fraction = 0.0; expected a finite number in \(0, 1\]"),
    ("seed", -1, r"config.seed = -1; expected an integer >= 0"),
    ("eval_samples", 0, r"config.eval_samples = 0; use -1 for every test record"),
    ("lora.targets", ("to_q", "to_kk"), r"config.lora.targets: target 'to_kk' matches no layer"),
    ("resume_accept", ("optim.lr",), r"config.optim.lr: missing field"),
    ("resume_accept", ("model.scan_blocks",), r"config.resume_accept names 'model.scan_blocks': it changes how"),
    ("mesh.rules", (("batch", ("data", "fsdp")), ("embed", "fsdp")),
     r"config.mesh.rules has no rule for the logical axis 'layers'"),
])
def test_bad_values_name_the_field(field, value, message):
  c = _load("tiny")
  section, _, key = field.rpartition(".")
  (c[section] if section else c)[key] = value
  with pytest.raises(run_config.ConfigError, match=message):
    run_config.validate(c, num_devices=8)


@pytest.mark.parametrize("name", ["tiny", "tiny_qwen_image_edit"])
def test_unmatched_lora_target_is_one_short_line(name):
  """A target that matches no layer is named with the nearest layer names and the kinds of layer there are, not
  the list of every adaptable layer (over a thousand characters)."""
  c = _load(name)
  c.lora.targets = ("to_q", "to_kk")
  with pytest.raises(run_config.ConfigError) as e:
    run_config.validate(c, num_devices=8)
  message = str(e.value)
  assert message.startswith("config.lora.targets: target 'to_kk' matches no layer of the ") and "'to_k'" in message
  assert "transformer_blocks.<0-" in message and "attn.add_k_proj" not in message
  assert "\n" not in message and len(message) < 320


def test_rollouts_must_divide_over_processes():
  c = _load("tiny")
  c.data.groups_per_epoch, c.data.group_size = 3, 3
  with pytest.raises(run_config.ConfigError, match="9 rollouts do not divide over 2 processes"):
    run_config.validate(c, num_devices=8, num_processes=2)


def test_every_numeric_field_has_a_range():
  """A new numeric knob without a checked range fails here (a negative clip norm once flipped every update)."""
  def numeric(node, prefix=""):
    for k, v in node.items():
      if hasattr(v, "items"):
        yield from numeric(v, f"{prefix}{k}.")
      elif isinstance(v, (int, float)) and not isinstance(v, bool):
        yield f"{prefix}{k}"
  unchecked = set(numeric(_load("tiny"))) - set(run_config.RANGES) - set(run_config.CHOICES)
  assert not unchecked


def test_resume_differences_skip_safe_and_accepted_fields():
  saved = run_config.as_json(_load("tiny"))
  c = _load("tiny")
  c.num_epochs, c.eval_every, c.mesh.shape = 40, 3, (1, -1, 1)
  assert run_config.resume_differences(saved, c) == []
  c.optim.learning_rate, c.lora.targets = 5e-4, ("to_q",)
  assert run_config.resume_differences(saved, c) == [
      "config.lora.targets: saved ['to_q', 'to_k', 'to_v', 'to_out.0', 'add_q_proj', 'add_k_proj', 'add_v_proj', "
      "'to_add_out'], now ['to_q']",
      "config.optim.learning_rate: saved 0.001, now 0.0005"]
  c.resume_accept = ("optim.learning_rate",)
  assert [line.split(":")[0] for line in run_config.resume_differences(saved, c)] == ["config.lora.targets"]


def test_a_field_added_since_the_checkpoint_resumes_at_its_default():
  """A checkpoint written before `data.text_max_length` existed: resuming is fine while the new field keeps its
  default, refused when it is set to something else."""
  saved = run_config.as_json(_load("tiny"))
  del saved["data"]["text_max_length"]
  c = _load("tiny")
  assert run_config.resume_differences(saved, c) == []
  c.data.text_max_length = 64
  assert run_config.resume_differences(saved, c) == ["config.data.text_max_length: saved '(absent)', now 64"]


def test_a_checkpoint_from_before_scanned_blocks_keeps_them_apart():
  """A checkpoint written before `model.scan_blocks` existed holds its blocks apart: the saved config means False
  there, so resuming with the (scanned) default is refused by name, and with scan_blocks=False it resumes."""
  saved = run_config.as_json(_load("tiny"))
  del saved["model"]["scan_blocks"]
  assert run_config.saved_config(saved).model.scan_blocks is False
  c = _load("tiny")
  assert run_config.resume_differences(saved, c) == ["config.model.scan_blocks: saved False, now True"]
  c.model.scan_blocks = False
  assert run_config.resume_differences(saved, c) == []


@pytest.mark.parametrize("slice_name", ["v5p-8", "v6e-8", "v4-8", "v5e-16"])
def test_kontext_slice_settings(slice_name, tmp_path):
  """`--config=configs/kontext.py:<slice>`: the paper's run plus that slice's measured settings, nothing else."""
  module = importlib.import_module("configs.kontext")
  c, paper = module.get_config(slice_name), module.get_config()
  changed = {f"{s}.{k}" for s in paper.keys() if hasattr(paper[s], "keys") for k in paper[s].keys()
             if c[s][k] != paper[s][k]}
  assert changed == {f for f, v in module.SLICES[slice_name].items() if paper[f.split(".")[0]][f.split(".")[1]] != v}
  for field, value in module.SLICES[slice_name].items():
    section, name = field.split(".")
    assert c[section][name] == value
  c.model.pipeline_dir = c.reward.model_dir = c.data.dataset_dir = str(tmp_path)
  run_config.validate(c, num_devices=8)


def test_unknown_slice_is_named():
  with pytest.raises(ValueError, match=r"^configs/kontext.py:v9-8: no settings for that slice; measured: \["):
    importlib.import_module("configs.kontext").get_config("v9-8")


def test_paths_may_be_bucket_urls(gcs):
  """Every folder / file of the config may be a gs:// URL; bad bucket input is one ConfigError naming the field,
  from validation (before any model loads)."""
  c = _load("tiny")
  c.data.dataset_dir = gcs.upload(os.path.join(os.path.dirname(run_config.__file__), "data", "demo"))
  template = gcs.url("template.txt")
  paths.write_text(template, "{instruction}")
  c.reward.template_file, c.data.tfds_dir = template, gcs.url("tfds")
  c.eval_benchmark, c.eval_benchmark_dir, c.eval_judge_dir = "gedit", c.data.dataset_dir, c.data.dataset_dir
  c.eval_benchmark_prompts = template
  run_config.validate(c, num_devices=8)
  for field, value, message in [
      ("data.dataset_dir", "gs://no-such-bucket/data", "bucket 'no-such-bucket' does not exist"),
      ("data.dataset_dir", gcs.url("nothing"), "folder not found"),
      ("data.dataset_dir", "s3://b/data", "URL scheme s3:// is not supported"),
      ("reward.template_file", gcs.url("missing.txt"), "file not found"),
      ("model.init_lora", "gs://no-such-bucket/lora.safetensors", "bucket 'no-such-bucket' does not exist"),
      ("data.tfds_dir", "s3://b/tfds", "URL scheme s3:// is not supported"),
      ("eval_judge_dir", gcs.url("judge"), "folder not found"),
      ("eval_benchmark_prompts", gcs.url("prompts.json"), "file or folder not found"),
  ]:
    bad = c.copy_and_resolve_references()
    section, _, key = field.rpartition(".")
    (bad[section] if section else bad)[key] = value
    with pytest.raises(run_config.ConfigError) as e:
      run_config.validate(bad, num_devices=8)
    assert str(e.value).startswith(f"config.{field} = {value!r}: {message}"), str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 200
  c.eval_benchmark, c.eval_benchmark_items = "imgedit", template  # ImgEdit's items file: any file is checked
  run_config.validate(c, num_devices=8)
  for field, value, message in [
      ("eval_benchmark_items", gcs.url("basic_edit.json"), "config.eval_benchmark_items = "),
      ("eval_judge_min_pixels", 20000, "config.eval_judge_min_pixels = 20000 exceeds config.eval_judge_max_pixels"),
      ("eval_benchmark", "gedit", "config.eval_benchmark_items: only ImgEdit takes an items file"),
  ]:
    bad = c.copy_and_resolve_references()
    bad[field], bad.eval_judge_max_pixels = value, 10000
    with pytest.raises(run_config.ConfigError, match="^" + re.escape(message)):
      run_config.validate(bad, num_devices=8)
