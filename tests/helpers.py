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
