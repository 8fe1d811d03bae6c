#!/usr/bin/env bash
# The README's main-job command on the embedded default config (device_configs/cpu-dev.yaml):
# build the demo task models, pack them, verify and inspect the pack, run a switching
# session, generate with the demo MoE model under half of its experts, drive both over the
# device service, and run a small fleet (a server and two devices) on loopback.
# Everything is generated locally; nothing is downloaded.
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
echo
echo "== 5. a switching session on $cfg"
$py -m edgert demo --pack "$pack" --models "$out" --config "$cfg"

echo
echo "== 6. an MoE language model with half of its experts in memory (exact mode)"
moe=models/out/moe                       # the benchmark model: python -m models.moe.train
if [ ! -f "$moe/model.safetensors" ]; then
  moe=models/out/moe-demo
  if [ ! -f "$moe/model.safetensors" ]; then
    echo "(training a short run of the MoE recipe, about 1.5 minutes on 2 cores)"
    $py -m models.moe.train --steps 120 --out "$moe"
  fi
  echo "(120 training steps: expect rough text; python -m models.moe.train trains the"
  echo " benchmark model in about 10 minutes, and this step then uses it)"
fi
[ "$moe.edgepack" -nt "$moe/model.safetensors" ] || $py -m edgert pack hf "$moe" -o "$moe.edgepack"
$py -m edgert generate "$moe.edgepack" --config "$cfg" --expert-budget 0.5 --stats \
  --temperature 0.6 --max-new-tokens 160 --prompt "import os
def "

echo
echo "== 7. the device service: another process drives both packs over ZeroMQ"
run=$(mktemp -d "${TMPDIR:-/tmp}/edgert-demo.XXXXXX")      # private (0700): the socket lives here
ep="ipc://$run/edgert.sock"
$py -m edgert serve --pack tasks="$pack" --pack lm="$moe.edgepack" --config "$cfg" \
  --bind "$ep" > "$run/serve.log" 2>&1 &
serve=$!
trap 'kill "$serve" 2>/dev/null || true; rm -rf "$run"' EXIT
until grep -q "ready on" "$run/serve.log"; do
  kill -0 "$serve" 2>/dev/null || { cat "$run/serve.log"; exit 1; }
  sleep 0.2
done
cat "$run/serve.log"
$py -m edgert client "$ep" hello
$py -m edgert client "$ep" switch lane
$py -c "import numpy as np; np.save('$run/x.npy', np.random.default_rng(0).standard_normal((1, 3, 112, 112)).astype(np.float32))"
$py -m edgert client "$ep" infer --task sign --input image="$run/x.npy" --repeat 30
$py -m edgert client "$ep" generate --temperature 0.6 --max-new-tokens 96 --prompt "import os
def "
$py -m edgert client "$ep" shutdown > /dev/null
wait "$serve"                     # the service's own exit status: 0 when it stopped cleanly
tail -1 "$run/serve.log"
echo
echo "== 8. a fleet: a server and two devices on loopback (prewarm hints, a shared prefix, a signed task update, the server stopped)"
$py tools/fleet_demo.py "$pack" "$moe.edgepack" "$cfg" "$run"
