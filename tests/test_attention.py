"""The attention kernels: the TPU's splash kernel (Pallas interpret mode on this CPU) against XLA's attention, forward
and gradient, for the shape of every call site in the project; the platform's choice ("auto"); the kernel under
shard_map on the 8-device mesh."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import float32_bound, max_rel_err

from editr1_jax import attention as attn
from editr1_jax import sharding as shd

# Both kernels sum the same float32 products in other orders: logits over head_dim, the softmax over the keys (splash
# block by block, rescaling its running sums: one more rounding per block) and p.v over the keys; the longest is the
# padded key length (<= 256 here). Three reductions in sequence forward, twice that for a gradient.
FORWARD_BOUND = float32_bound(256, depth=4)
GRADIENT_BOUND = float32_bound(256, depth=8)


def qkv(batch, lq, lk, heads, dim, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((batch, n, heads, dim)), jnp.float32) for n in (lq, lk, lk))


def left_padded(batch_pads, length):
  return jnp.asarray(np.arange(length)[None] >= np.asarray(batch_pads)[:, None])


# Each call site's shape: (batch, Lq, Lk, heads, head_dim, {kv_valid, causal, q_offset}, which query rows are used).
SITES = {
    # FLUX joint attention over [text | image]: no mask; 45 tokens pad to one 128-block
    "flux_joint": (2, 45, 45, 3, 16, {}, None),
    # Qwen-Image joint attention: [9 text | 31 image] tokens, row 1's text tokens 5..8 padding, masked as keys
    "qwen_image_joint": (2, 40, 40, 2, 16, {"kv_valid": jnp.asarray(~((np.arange(40)[None] >= 5)
                                                                     & (np.arange(40)[None] < 9)
                                                                     & (np.arange(2)[:, None] == 1)))}, None),
    # Qwen2.5-VL decoder prefill: causal over left-padded rows (padding rows' outputs are never used)
    "decoder_prefill": (2, 30, 30, 4, 16, {"kv_valid": left_padded([0, 7], 30), "causal": True},
                        left_padded([0, 7], 30)),
    # the prefill written into a longer cache (keys beyond the prompt: the generation's slots)
    "decoder_prefill_into_cache": (2, 30, 38, 4, 16, {"kv_valid": left_padded([0, 7], 38), "causal": True},
                                   left_padded([0, 7], 30)),
    # the vision tower: windows gathered into groups, the slots past a window's end masked (and never used)
    "vision_groups": (3, 16, 16, 2, 20, {"kv_valid": jnp.asarray(np.arange(16)[None] < np.array([[16], [9], [4]]))},
                      jnp.asarray(np.arange(16)[None] < np.array([[16], [9], [4]]))),
    # CLIP: causal, every token real
    "clip_causal": (2, 77, 77, 2, 16, {"causal": True}, None),
    # the VAE mid-block: one head as wide as the channels (64 here: padded to 128 lanes)
    "vae_mid_block": (1, 35, 35, 1, 64, {}, None),
    # a sequence longer than one 512-block: 700 tokens pad to 1024
    "long": (1, 700, 700, 1, 8, {"kv_valid": jnp.asarray(np.arange(700)[None] < 650)}, None),
}


def _used(out, rows):
  return out if rows is None else jnp.where(rows[:, :, None, None], out, 0.0)


@pytest.mark.parametrize("site", SITES)
def test_splash_equals_xla_forward_and_gradient(site):
  batch, lq, lk, heads, dim, kw, rows = SITES[site]
  q, k, v = qkv(batch, lq, lk, heads, dim)
  run = lambda impl: lambda q, k, v: _used(attn.attention(q, k, v, implementation=impl, **kw), rows)
  ref, got = run("xla")(q, k, v), run("splash")(q, k, v)
  assert got.shape == ref.shape == (batch, lq, heads, dim)
  assert max_rel_err(got, ref) <= FORWARD_BOUND
  cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(ref.shape), jnp.float32)
  grads = lambda impl: jax.grad(lambda *x: jnp.sum(run(impl)(*x) * cotangent), (0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", grads("splash"), grads("xla")):
    assert max_rel_err(a, b) <= GRADIENT_BOUND, name


def test_cached_decode_step():
  """One new token over a cache (a traced offset): it sees the filled positions up to its own, no later slot."""
  q, k, v = qkv(2, 1, 40, 4, 16)
  valid = left_padded([0, 7], 40)
  step = lambda impl: jax.jit(lambda o, k, v: attn.attention(q, k, v, kv_valid=valid, causal=True, q_offset=o,
                                                             implementation=impl))
  for offset in (12, 39):
    assert max_rel_err(step("splash")(offset, k, v), step("xla")(offset, k, v)) <= FORWARD_BOUND
  later = lambda x: x.at[:, 13:].set(1e3)  # the slots after position 12 hold anything
  np.testing.assert_array_equal(step("splash")(12, later(k), later(v)), step("splash")(12, k, v))


def test_causal_several_queries_need_a_host_offset():
  q, k, v = qkv(1, 4, 16, 1, 8)
  with pytest.raises(ValueError, match="traced query offset takes one query at a time, got 4"):
    jax.jit(lambda o: attn.attention(q, k, v, causal=True, q_offset=o, implementation="splash"))(3)


def test_a_bias_keeps_xla_and_says_so(caplog):
  """T5's relative-position bias: no splash kernel takes it, so "splash" runs XLA's attention, said once."""
  q, k, v = qkv(2, 9, 9, 2, 8)
  bias = jnp.asarray(np.random.default_rng(2).standard_normal((1, 2, 9, 9)), jnp.float32)
  attn._say_once.cache_clear()
  with caplog.at_level(logging.WARNING, logger="editr1_jax.attention"):
    for _ in range(2):
      got = attn.attention(q, k, v, bias=bias, scale=1.0, implementation="splash", where="T5 attention")
  np.testing.assert_array_equal(got, attn.attention(q, k, v, bias=bias, scale=1.0, implementation="xla"))
  said = [r.getMessage() for r in caplog.records]
  assert said == ["T5 attention: the splash kernel takes no additive bias (relative positions): XLA attention"]


@pytest.mark.parametrize("platform,dtype,head_dim,expected", [
    ("tpu", jnp.float32, 128, "splash"),
    ("tpu", jnp.bfloat16, 80, "splash"),
    ("gpu", jnp.bfloat16, 128, "cudnn"),
    ("gpu", jnp.float16, 64, "cudnn"),
    ("gpu", jnp.float32, 128, "xla"),  # cuDNN's fused kernel takes half precision only
    ("gpu", jnp.bfloat16, 256, "xla"),  # ... and head_dim <= 128
    ("gpu", jnp.bfloat16, 100, "xla"),  # ... a multiple of 8
    ("cpu", jnp.bfloat16, 128, "xla"),
])
def test_auto_picks_the_platforms_kernel(monkeypatch, caplog, platform, dtype, head_dim, expected):
  monkeypatch.setattr(attn, "platform", lambda: platform)
  attn._say_once.cache_clear()
  with caplog.at_level(logging.WARNING, logger="editr1_jax.attention"):
    assert attn.resolve("auto", dtype, head_dim) == expected
  assert bool(caplog.records) == (platform == "gpu" and expected == "xla")  # a GPU fallback is said
  for forced in ("xla", "cudnn", "splash"):
    assert attn.resolve(forced, dtype, head_dim) == forced


def test_platform_is_the_meshs(monkeypatch):
  """A plan traces under a mesh of compile-only TPU devices on a CPU host: the mesh's platform decides."""
  assert attn.platform() == "cpu"
  tpu = type("Device", (), {"platform": "tpu"})()
  monkeypatch.setattr(shd, "active_mesh", lambda: type("Mesh", (), {"devices": np.array([tpu])})())
  assert attn.platform() == "tpu" and attn.resolve("auto", jnp.bfloat16, 128) == "splash"


def test_one_knob_reaches_every_network():
  """`config.model.attention_impl` is every network's of a run: policy, VAE, text encoders, judge."""
  from configs import tiny as tiny_config
  from configs import tiny_qwen_image_edit
  from editr1_jax import families
  from editr1_jax import reward as rewards
  for module in (tiny_config, tiny_qwen_image_edit):
    config = module.get_config()
    config.model.attention_impl = "splash"
    family = families.build(config)
    text = [family.text.clip, family.text.t5] if hasattr(family.text, "t5") else [family.text.model]
    for net in [family.transformer, family.vae] + text:
      assert net.cfg.attention_impl == "splash", type(net).__name__
    if config.reward.kind == "mllm":
      assert rewards.build(config).judge.cfg.attention_impl == "splash"


def test_unknown_implementation_is_an_error():
  with pytest.raises(ValueError,
                     match=r"attention_impl must be one of \('auto', 'xla', 'cudnn', 'splash'\), got 'flash'"):
    attn.check_implementation("flash")
  q, k, v = qkv(1, 4, 4, 1, 8)
  with pytest.raises(ValueError, match="got 'flash'"):
    attn.attention(q, k, v, implementation="flash")


@pytest.mark.parametrize("length,block,padded", [(1, 128, 128), (37, 128, 128), (200, 256, 256), (512, 512, 512),
                                                 (700, 512, 1024), (2432, 512, 2560)])
def test_block_size_follows_the_sequence(length, block, padded):
  assert attn.block_size(length) == block and -(-length // block) * block == padded


def test_sharded_kernel_equals_one_device():
  """On a (2, 2, 2) mesh the kernel runs under shard_map, rows over data x fsdp and heads over tensor."""
  assert len(jax.devices()) >= 8, "conftest sets 8 host devices"
  mesh = shd.make_mesh((2, 2, 2))
  q, k, v = qkv(4, 37, 37, 4, 16)
  valid = left_padded([0, 5, 0, 9], 37)
  one = attn.attention(q, k, v, kv_valid=valid, implementation="splash")

  @jax.jit
  def sharded(q, k, v, valid):
    with shd.use_mesh(mesh):
      return attn.attention(q, k, v, kv_valid=valid, implementation="splash")

  np.testing.assert_allclose(sharded(q, k, v, valid), one, rtol=0, atol=FORWARD_BOUND)
