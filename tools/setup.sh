#!/usr/bin/env bash
# Create .venv with everything edgert and its tests need. Idempotent: a second run only
# checks. Used by the README's commands and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.edgert-setup"
want="$(cat pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

# The fleet server's tests start a real redis-server (Debian's package) on loopback.
if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's redis-server (the fleet tests start one on loopback)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    # NOTE: only the binary is needed; the tests start their own on a free port
    systemctl disable --now redis-server >/dev/null 2>&1 || true
  else
    echo "setup: redis-server is missing and cannot be installed here (needs root and apt-get):" \
         "install it (apt-get install redis-server) or the fleet store tests fail" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
$pip install -q --upgrade pip >/dev/null

# torch first, so the project's `torch>=2.4` is already met and pip pulls no multi-GB build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -f /etc/nv_tegra_release ]; then
    echo "Jetson detected: install NVIDIA's JetPack torch wheel into $VENV first (see README)." >&2
    exit 1
  elif command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: torch 2.13.0 with CUDA from PyPI"
    $pip install -q "torch==2.13.0"
  else
    # No GPU: the CPU build from PyTorch's CPU wheel index (PyPI's x86_64 torch is the
    # multi-GB CUDA build). Where that index cannot be reached, pip's own sources (a local
    # wheel directory, PyPI) are the fallback, and we say which build arrived.
    if $pip install -q --retries 1 --timeout 20 \
         --index-url https://download.pytorch.org/whl/cpu \
         --extra-index-url https://pypi.org/simple "torch==2.13.0" 2>/dev/null; then
      :
    else
      echo "setup: PyTorch's CPU wheel index is unreachable; installing torch from PyPI" >&2
      $pip install -q "torch==2.13.0"
    fi
  fi
  "$VENV/bin/python" -c "import torch; print('setup: torch', torch.__version__, \
'(CUDA ' + torch.version.cuda + ')' if torch.version.cuda else '(CPU build)')"
fi
# ONNX Runtime on aarch64 that is not a Jetson: the CPU package (x86_64 gets onnxruntime-gpu
# from pyproject; Jetson gets NVIDIA's wheel by hand). Never both in one environment.
if [ "$(uname -m)" = "aarch64" ] && ! "$VENV/bin/python" -c "import onnxruntime" 2>/dev/null; then
  [ -f /etc/nv_tegra_release ] || $pip install -q onnxruntime
fi
$pip install -q -e ".[test,plot]"
echo "$want" > "$stamp"
