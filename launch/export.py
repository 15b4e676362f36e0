"""Export a run's adapter to PyTorch: `python launch/export.py --workdir=DIR --out=OUT [--weights ema|current] [--merged]`.

WORKDIR and OUT may be gs:// URLs. Writes OUT/pytorch_lora_weights.safetensors (diffusers LoRA layout: `FluxKontextPipeline.load_lora_weights(OUT)`)
and, with --merged, OUT/transformer/ (a diffusers FluxTransformer2DModel folder with the adapter folded in).
"""

import sys


from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "current"], "Which parameters to export.")
_MERGED = flags.DEFINE_bool("merged", False, "Also write the transformer with the adapter merged in.")
_EPOCH = flags.DEFINE_integer("epoch", None, "Checkpoint epoch (default: the latest).")
flags.mark_flags_as_required(["workdir", "out"])


def check_args(workdir: str, out: str, epoch: int | None) -> None:
  """Every argument checked before anything is imported or created; raises ValueError naming the flag."""
  from editr1_jax import paths  # pylint: disable=import-outside-toplevel
  try:
    paths.check_bucket(workdir, "--workdir")
    paths.check_bucket(out, "--out")
  except paths.PathError as e:
    raise ValueError(str(e)) from None
  checkpoints = paths.join(workdir, "checkpoints")
  if not paths.isdir(checkpoints):
    raise ValueError(f"--workdir: {checkpoints} does not exist")
  if paths.isfile(out):
    raise ValueError(f"--out: {out} is an existing file, not a folder")
  if epoch is not None and epoch < 0:
    raise ValueError(f"--epoch must be >= 0, got {epoch}")


def main(argv):
  del argv
  try:
    check_args(_WORKDIR.value, _OUT.value, _EPOCH.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every read at INFO
    logging.set_verbosity(logging.WARNING)
  from editr1_jax.export import export_run
  written = export_run(_WORKDIR.value, _OUT.value, weights=_WEIGHTS.value, merged=_MERGED.value, epoch=_EPOCH.value)
  for path in written:
    print(path)


if __name__ == "__main__":
  app.run(main)
