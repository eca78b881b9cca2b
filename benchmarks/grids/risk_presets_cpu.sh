#!/usr/bin/env bash
# The CPU grid of docs/results.md ("The risk split presets side by side"), in phases by
# priority. Each run is saved in OUT/runs as it ends and a rerun skips finished runs, so the
# grid spans sessions: copy benchmarks/results/robustness-cpu/runs into OUT/runs to resume.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-robustness-cpu}
PY=${PY:-.venv/bin/python}
B="$PY benchmarks/bench_robustness.py --out $OUT --ablations --beyond"
$B --datasets mnist fashion-mnist --seeds 0 --rates 0.001 --variants clip roclip robust safeclip floor
$B --datasets mnist fashion-mnist --seeds 0 --rates 0.01 --variants clip roclip robust floor
# the candidate that keeps Fashion-MNIST's clean accuracy: robust without image augmentation
$B --datasets fashion-mnist --seeds 0 --rates 0.001 0.01 --variants robust-noimg
$B --datasets mnist fashion-mnist --seeds 0 --rates 0.0005 --variants clip roclip robust floor
$B --datasets mnist fashion-mnist --seeds 1 2 --rates 0.001 --variants clip roclip robust safeclip floor
$B --datasets mnist fashion-mnist --seeds 1 2 --rates 0.01 0.0005 --variants clip roclip robust floor
# robust as it ran before its captions lost EDA (EDA drops or swaps some captions' class
# word), with its own floor: the saved robust-eda and floor-eda rows
$B --datasets fashion-mnist mnist --seeds 0 1 2 --rates 0.001 0.01 0.0005 --variants robust-eda floor-eda
# the other triggers, one seed each at 0.1% (the goal: where they take on plain CLIP)
$B --datasets mnist fashion-mnist --seeds 0 --rates 0.001 --variants clip robust --trigger patch
$B --datasets mnist fashion-mnist --seeds 0 --rates 0.001 --variants clip robust --trigger wanet
# the lighter crop (roclip-light, 0.8-1.0 of the image) with its own floor: more clean
# zero-shot than robust in every cell, more attack success in five of six (results.md)
$B --datasets fashion-mnist mnist --seeds 0 1 2 --rates 0.001 0.01 0.0005 --variants robust-light floor-light
