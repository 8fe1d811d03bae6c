#!/usr/bin/env bash
# The README's main-job command on the embedded default config (device_configs/cpu-dev.yaml):
# build the demo task models, pack them, verify and inspect the pack, then run a switching
# session. Everything is generated locally; nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
py=.venv/bin/python
out=models/out/tasks
pack=models/out/tasks.edgepack
cfg=${EDGERT_CONFIG:-device_configs/cpu-dev.yaml}

echo "== 1. demo task models (one ViT backbone, four sparse fine-tunes)"
$py -m models.tasks.build --out "$out"
echo
echo "== 2. pack them: shared blocks stored once"
$py -m edgert pack onnx --base "$out/base.onnx" \
  --task detect="$out/detect.onnx" --task lane="$out/lane.onnx" \
  --task sign="$out/sign.onnx" --task parking="$out/parking.onnx" -o "$pack"
echo
echo "== 3. verify every block"
$py -m edgert verify "$pack"
echo
echo "== 4. inspect: sharing and switch costs"
$py -m edgert inspect "$pack"
if $py -m edgert demo --help >/dev/null 2>&1; then
  echo
  echo "== 5. a switching session on $cfg"
  $py -m edgert demo --pack "$pack" --models "$out" --config "$cfg"
fi
