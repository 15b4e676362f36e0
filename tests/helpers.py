"""Helpers shared by the tests."""

import numpy as np


def max_rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref|: the parity metric used throughout the tests."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def perturb_(module, scale: float = 0.1, seed: int = 0) -> None:
  """Add noise to every tensor of a torch module so none stays zero or one."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in list(module.parameters()) + list(module.buffers()):
      if p.is_floating_point():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


EPS32 = 2.0 ** -24  # float32 unit roundoff: half an ulp of 1.0, 6.0e-8


def float32_bound(reduction_length: int, depth: int = 1, *, condition: float = 1.0, safety: float = 4.0) -> float:
  """The max_rel_err allowed between two float32 evaluations of the same math that differ only in rounding:
  the order of a sum (devices splitting it, vectorisation, fusion, jit vs eager, PyTorch's kernels), or
  float32 against a float64 reference.

  Model: a float32 sum of n terms is off by at most n * eps relative (eps = 2^-24) and, its rounding errors
  being independent and of either sign, typically by sqrt(n) * eps. A value whose path goes through `depth`
  reductions in sequence (matmul K, conv kh*kw*Cin, norm statistics, attention over the sequence), each at
  most `reduction_length` long, in a network that keeps activations normalised (norms, residuals: relative
  errors pass through about 1:1), collects `depth` such independent errors: sqrt(depth * n) * eps.
  `condition` scales it where an operation amplifies relative error (a difference of close values; a
  square doubles it). `safety` 4 = sqrt(2) (both sides round) * sqrt(2 ln 1e5) (the largest of up to 1e5
  outputs, 4.8 sigmas) / sqrt(3) (the sigma of a rounding error uniform in +-eps is eps / sqrt(3)).
  XLA and PyTorch sum in blocks, and most reductions on a path are shorter than the longest, so the model
  overestimates: the tests measure 0.002x..0.15x of their bounds. A real bug (a wrong sign, a missing term, a
  transposed layout) errs by 1e-2..1, and no bound may come within 10x of that.
  """
  bound = safety * condition * (depth * reduction_length) ** 0.5 * EPS32
  assert bound <= 1e-3, f"float32_bound {bound:.1e}: this loose, it would hide real bugs"
  return bound


EPS_BF16 = 2.0 ** -9  # bfloat16 unit roundoff (8 significant bits), 2.0e-3


def bfloat16_bound(depth: int, *, safety: float = 3.0) -> float:
  """The max_rel_err allowed between a bfloat16 run and the float32 one: every stored activation rounds to 8
  bits, and a value passing `depth` normalised layers collects sqrt(depth) such errors: sqrt(depth) * EPS_BF16.
  Measured on the 2-core CI-like machine, err / (sqrt(depth) * EPS_BF16) is 0.6 (Qwen-Image, FLUX 0.6), 0.96
  (Qwen2.5-VL, CLIP), 1.05 (Qwen-Image VAE encoder), 1.15 (FLUX VAE decoder); safety 3 leaves 2.6x..5x room for
  CPUs that compute bf16 dots otherwise (native bf16 units or a float32 upcast). A real bug in the bf16 path (a
  norm's statistics in bf16, a wrong cast, a missing scale) errs by 1e-1..1: the bound stays below 0.06.
  Where the reference itself errs more in bf16 (T5, the Qwen-Image VAE decoder), tests bound by its error."""
  bound = safety * depth ** 0.5 * EPS_BF16
  assert bound <= 0.06, f"bfloat16_bound {bound:.2f}: this loose, it would hide real bugs"
  return bound


def override(config, **fields):
  """`config` with each dotted field ("data.group_size") set to its value; returns the config."""
  for key, value in fields.items():
    section, _, field = key.rpartition(".")
    node = config
    for part in section.split(".") if section else ():
      node = node[part]
    node[field] = value
  return config
