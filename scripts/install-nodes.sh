#!/usr/bin/env bash
# Install this checkout's dyn on every SSH node of a topology, from the head (once per rack).
#
# Builds a wheel of the checkout (or takes --wheel), sends it to each node over ssh, installs it into
# a venv on the node (default ~/.local/share/dyn/venv) with the given torch, and links
# `dyn` into ~/.local/bin, where `dyn up` and scripts/dyn-planner.service look for it.
# Nodes are done in parallel (--jobs); each node's output goes to LOGDIR/<node>.log.
# Afterwards `dyn doctor -t TOPOLOGY` checks that every node reports the head's version.
set -euo pipefail
usage() {
    cat <<'USAGE'
usage: scripts/install-nodes.sh -t TOPOLOGY [--wheel FILE] [--venv DIR] [--torch SPEC]
                                [--jobs N] [--logdir DIR] [--dry-run]
  -t TOPOLOGY   topology file or shipped name (its SSH nodes are installed)
  --wheel FILE  install this wheel instead of building one from the checkout
  --venv DIR    venv on each node (default: ~/.local/share/dyn/venv)
  --torch SPEC  torch requirement (default: torch==2.13.0; use the CUDA index on GPU nodes)
  --jobs N      nodes installed at once (default 8)
  --dry-run     print every command instead of running it
example: scripts/install-nodes.sh -t topologies/gb200-nvl72.yaml --dry-run
USAGE
}
here="$(cd "$(dirname "$0")" && pwd)"; repo="$(dirname "$here")"
topology="" wheel="" venv='~/.local/share/dyn/venv' torch="torch==2.13.0" jobs=8 logdir="" dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        -t|--topology) topology="$2"; shift 2;;
        --wheel) wheel="$2"; shift 2;;
        --venv) venv="$2"; shift 2;;
        --torch) torch="$2"; shift 2;;
        --jobs) jobs="$2"; shift 2;;
        --logdir) logdir="$2"; shift 2;;
        --dry-run) dry=1; shift;;
        -h|--help) usage; exit 0;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2;;
    esac
done
[ -n "$topology" ] || { usage >&2; exit 2; }
python="${PYTHON:-$(command -v python3)}"
run() { if [ "$dry" = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi; }
if [ -z "$wheel" ]; then
    wheel_dir="$(mktemp -d)"
    trap 'rm -rf "$wheel_dir"' EXIT
    run "$python" -m pip wheel --no-deps -q -w "$wheel_dir" "$repo"
    wheel="$(ls "$wheel_dir"/dyn-*.whl 2>/dev/null || echo "$wheel_dir/dyn-VERSION-py3-none-any.whl")"
fi
[ "$dry" = 1 ] || [ -f "$wheel" ] || { echo "no wheel at $wheel" >&2; exit 2; }
nodes="$("$python" "$here/_topology_nodes.py" "$topology")"
[ -n "$nodes" ] || { echo "no SSH nodes in $topology" >&2; exit 0; }
own_logdir=0
if [ -z "$logdir" ] && [ "$dry" = 0 ]; then logdir="$(mktemp -d)"; own_logdir=1; fi
[ "$dry" = 1 ] || mkdir -p "$logdir"
# The wheel travels on the install's own ssh session (stdin), not scp: nothing but a shell is
# needed on the node (scp speaks SFTP, a subsystem some nodes do not run). pip needs the
# wheel's real file name; it goes to a private temp dir on the node, removed afterwards.
on_node="$(basename "$wheel")"
remote="set -e; d=\$(mktemp -d); trap 'rm -rf \"\$d\"' EXIT; cat > \"\$d/$on_node\"; \
python3 -m venv $venv; $venv/bin/pip install -q '$torch' \"\$d/$on_node\"; \
mkdir -p ~/.local/bin; ln -sf $venv/bin/dyn ~/.local/bin/dyn; ~/.local/bin/dyn --version"
pids=()
while read -r name address port user identity known; do
    target="$address"; [ "$user" = "-" ] || target="$user@$address"
    ssh_opts=(-p "$port" -o BatchMode=yes)
    [ "$identity" = "-" ] || ssh_opts+=(-i "$identity")
    [ "$known" = "-" ] || ssh_opts+=(-o "UserKnownHostsFile=$known")
    if [ "$dry" = 1 ]; then
        run ssh "${ssh_opts[@]}" "$target" "$remote" "< $wheel"
        continue
    fi
    ssh "${ssh_opts[@]}" "$target" "$remote" <"$wheel" >"$logdir/$name.log" 2>&1 &
    pids+=("$!:$name")
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 0.2; done
done <<< "$nodes"
failed=0
for entry in "${pids[@]}"; do
    if wait "${entry%%:*}"; then echo "ok   ${entry#*:}"; else echo "FAIL ${entry#*:} (see $logdir/${entry#*:}.log)"; failed=1; fi
done
[ "$failed" = 1 ] || [ "$own_logdir" = 0 ] || rm -rf "$logdir"
exit $failed
