#!/usr/bin/env bash
# Edit-R1 training on a Cloud TPU pod slice, started from your workstation: copies this checkout to every host,
# installs it there, then runs `python launch/train.py --distributed ARGS` on all hosts at once (one process each;
# jax.distributed.initialize() finds the others). ARGS are this script's arguments, passed on unchanged.
#
#   TPU_NAME=my-tpu ZONE=us-central2-b [PROJECT=my-project] [PYTHON=python3.11] [EDITR1_CACHE=...] launch/tpu_pod.sh \
#     --config=configs/kontext.py --workdir=gs://my-bucket/runs/kontext --config.model.pipeline_dir=gs://... ...
#
# What is copied: this work tree as git sees it (tracked files with their uncommitted changes, and untracked files
# that are not ignored), replacing ~/editr1_jax on every host, so all hosts run the same code (train.py refuses to
# start otherwise). The venv ~/editr1_jax.venv is kept between runs and brought up to date (requirements.txt plus
# jax's TPU build); PYTHON (default python3) creates it and must be Python 3.11 or newer.
# Preemption: SIGTERM stops the run at the next safe point with its finished epochs saved (exit 0); run the same
# command again, on the recreated slice if it was spot, and it resumes from the workdir. The exit status is gcloud's:
# non-zero when a host failed or the connection dropped. A dropped connection can end the run: use tmux or screen.
set -euo pipefail
missing=""
for v in TPU_NAME ZONE; do [ -n "${!v:-}" ] || missing="$missing $v"; done
if [ -n "$missing" ]; then
  echo "tpu_pod.sh: set$missing (TPU_NAME=my-tpu ZONE=us-central2-b launch/tpu_pod.sh --config=... --workdir=gs://...)" >&2
  exit 2
fi
if [[ " $* " != *" --config"[=\ ]* || " $* " != *" --workdir"[=\ ]* ]]; then
  echo "tpu_pod.sh: give train.py's --config=... and --workdir=... (a gs:// URL every host can reach)" >&2
  exit 2
fi
gcloud_flags=(--zone="$ZONE" ${PROJECT:+"--project=$PROJECT"})
cd "$(dirname "$0")/.."

# The checkout, as a tarball copied to every host (files deleted in the work tree but not yet in git are left out).
tarball=$(mktemp "${TMPDIR:-/tmp}/editr1_jax.XXXXXX")
trap 'rm -f "$tarball"' EXIT
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
done | tar -czf "$tarball" --null -T -
echo "tpu_pod.sh: copying $(git describe --always --dirty) to every host of $TPU_NAME" >&2
gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:editr1_jax.tar.gz" --worker=all "${gcloud_flags[@]}"

# On every host: unpack, create the venv once, install (quick when nothing changed).
setup='set -e
rm -rf ~/editr1_jax && mkdir ~/editr1_jax && tar -xzf ~/editr1_jax.tar.gz -C ~/editr1_jax && rm ~/editr1_jax.tar.gz
if [ ! -x ~/editr1_jax.venv/bin/python ]; then
  "$PY" -c "import sys; sys.exit(sys.version_info < (3, 11))" || { echo "$(hostname): $PY is not Python 3.11+ (set PYTHON)" >&2; exit 1; }
  "$PY" -m venv ~/editr1_jax.venv
fi
cd ~/editr1_jax && ~/editr1_jax.venv/bin/pip install -q -r requirements.txt -e . "jax[tpu]==$(sed -n "s/^jax==\([^ ]*\).*/\1/p" requirements.txt)"'
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${gcloud_flags[@]}" \
  --command="PY=$(printf %q "${PYTHON:-python3}"); $setup"

# Every argument quoted for the remote shell (printf %q): spaces, $ and quotes in values arrive as typed.
# EDITR1_CACHE, when set here, is each host's local cache folder (default there: ~/.cache/editr1_jax).
cache=${EDITR1_CACHE:+EDITR1_CACHE=$(printf %q "$EDITR1_CACHE") }
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${gcloud_flags[@]}" \
  --command="cd ~/editr1_jax && ${cache}exec ~/editr1_jax.venv/bin/python launch/train.py --distributed$(printf ' %q' "$@")"
