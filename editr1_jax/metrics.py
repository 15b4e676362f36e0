"""Run metrics: TensorBoard scalars and image grids, and one console line per epoch (process 0 only)."""

import numpy as np
from PIL import Image, ImageDraw

from editr1_jax import images as imageio
from editr1_jax import paths


class MetricsWriter:

  def __init__(self, logdir: str, enabled: bool = True, image_dir: str | None = None):
    """`image_dir`: image grids are also written there as PNG files (`<tag>_<step>.png`)."""
    self.enabled, self.image_dir = enabled, image_dir
    self._writer = None
    if enabled:
      from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes
      paths.makedirs(logdir)
      self._writer = SummaryWriter(logdir)  # writes gs:// event files itself

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    for k, v in values.items():
      self._writer.add_scalar(k, float(v), step)
    self._writer.flush()

  def image(self, step: int, tag: str, grid: np.ndarray) -> None:
    if not self.enabled:
      return
    self._writer.add_image(tag, grid, step, dataformats="HWC")
    self._writer.flush()
    if self.image_dir:
      imageio.save(Image.fromarray(grid), paths.join(self.image_dir, f"{tag}_{step:05d}.png"))

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8; non-finite pixels are an error (mask such images before)."""
  images = np.asarray(images, np.float32)
  if not np.isfinite(images).all():
    raise ValueError(f"{int((~np.isfinite(images)).sum())} non-finite pixels cannot become an image")
  return np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)


def group_grid(sources: np.ndarray, edits: np.ndarray, scores: np.ndarray, group_size: int) -> np.ndarray:
  """One row per group: the source, then its k edits, each captioned with its score (NaN: invalid)."""
  edits = np.nan_to_num(np.asarray(edits, np.float32), nan=-1.0, posinf=1.0, neginf=-1.0)  # shown black; score nan
  n_groups = len(edits) // group_size
  h, w = edits.shape[1:3]
  label = 12
  grid = Image.new("RGB", ((group_size + 1) * w, n_groups * (h + label)), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  for g in range(n_groups):
    y = g * (h + label)
    grid.paste(Image.fromarray(to_uint8(sources[g * group_size])).resize((w, h)), (0, y + label))
    draw.text((2, y), "source", fill=(0, 0, 0))
    for j in range(group_size):
      i = g * group_size + j
      grid.paste(Image.fromarray(to_uint8(edits[i])), ((j + 1) * w, y + label))
      draw.text(((j + 1) * w + 2, y), f"{scores[i]:.3f}", fill=(0, 0, 0))
  return np.asarray(grid)


def columns_grid(columns: dict, rows: int = 8) -> np.ndarray:
  """The first `rows` items as rows, one captioned column per entry of `columns` (name -> uint8 (n, H, W, 3))."""
  arrays = [np.asarray(a)[:rows] for a in columns.values()]
  n, (h, w) = len(arrays[0]), arrays[0].shape[1:3]
  label = 12
  grid = Image.new("RGB", (len(arrays) * w, label + n * h), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  for j, (name, images) in enumerate(zip(columns, arrays)):
    draw.text((j * w + 2, 0), name, fill=(0, 0, 0))
    for i, image in enumerate(images):
      grid.paste(Image.fromarray(image).resize((w, h)), (j * w, label + i * h))
  return np.asarray(grid)


def summary_line(epoch: int, num_epochs: int, m: dict) -> str:
  """One console line; an evaluation of the starting weights (epoch 0) has only its eval part."""
  parts = [f"epoch {epoch}/{num_epochs}"]
  if "reward/mean" in m:
    parts += [f"reward {m['reward/mean']:.4f} ± {m['reward/std']:.4f}",
              f"kept {m['filter/kept_fraction']:.2f} (zero-std groups {m['filter/zero_std_fraction']:.2f})",
              f"loss {m['train/loss']:.4g} kl {m['train/kl']:.3g} old-div {m['train/old_divergence']:.3g}",
              f"grad {m['train/grad_norm']:.3g}",
              f"rollout {m['time/rollout_s']:.1f}s reward {m['time/reward_s']:.1f}s train {m['time/train_s']:.1f}s"]
  if "eval/reward_mean" in m:
    parts.append(f"eval reward {m['eval/reward_mean']:.4f}")
  if "eval/accuracy" in m:
    parts.append(f"eval accuracy {m['eval/accuracy']:.3f}")
  for key in sorted(k for k in m if k.count("/") == 3 and k.startswith("eval/")):  # eval/<benchmark>/<subset>/<metric>
    parts.append(f"{key[len('eval/'):]} {m[key]:.4g}")
  return " | ".join(parts)
