#!/usr/bin/env bash
# Give the head SSH access to every node of a topology and record their host keys (once per rack).
#
# For each SSH node: ssh-keyscan its host key into the topology's known_hosts file (or
# ~/.ssh/known_hosts), then ssh-copy-id the head's public key (asks for each node's password
# once unless keys already work). dyn never trusts unknown host keys by default, so this is
# what makes `dyn up` / `dyn doctor` work without --accept-new-host-keys.
# Verify the fingerprints it prints against the nodes' consoles before trusting them.
set -euo pipefail
usage() {
    cat <<'USAGE'
usage: scripts/distribute-keys.sh -t TOPOLOGY [--key PUBKEY] [--dry-run]
  -t TOPOLOGY  topology file or shipped name
  --key FILE   public key to install (default: the node's identity_file + .pub, else ~/.ssh/id_ed25519.pub)
  --dry-run    print every command instead of running it
example: scripts/distribute-keys.sh -t topologies/hgx-h100x8.yaml --dry-run
USAGE
}
here="$(cd "$(dirname "$0")" && pwd)"
topology="" key="" dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        -t|--topology) topology="$2"; shift 2;;
        --key) key="$2"; shift 2;;
        --dry-run) dry=1; shift;;
        -h|--help) usage; exit 0;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2;;
    esac
done
[ -n "$topology" ] || { usage >&2; exit 2; }
python="${PYTHON:-$(command -v python3)}"
run() { if [ "$dry" = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi; }
nodes="$("$python" "$here/_topology_nodes.py" "$topology")"
while read -r name address port user identity known; do
    [ -n "$name" ] || continue
    known_file="$known"; [ "$known_file" != "-" ] || known_file="$HOME/.ssh/known_hosts"
    pub="$key"; [ -n "$pub" ] || { [ "$identity" != "-" ] && pub="$identity.pub" || pub="$HOME/.ssh/id_ed25519.pub"; }
    target="$address"; [ "$user" = "-" ] || target="$user@$address"
    echo "# $name ($target:$port)"
    if [ "$dry" = 1 ]; then
        run ssh-keyscan -p "$port" -t ed25519 "$address" ">>" "$known_file"
    else
        mkdir -p "$(dirname "$known_file")"
        mkdir -p -m 700 "$HOME/.ssh"  # (ssh-copy-id keeps its temp files there)
        if ! { [ -f "$known_file" ] && ssh-keygen -F "$([ "$port" = 22 ] && echo "$address" || echo "[$address]:$port")" -f "$known_file" >/dev/null; }; then
            ssh-keyscan -p "$port" -t ed25519 "$address" 2>/dev/null | tee -a "$known_file" | ssh-keygen -lf - || true
        fi
    fi
    run ssh-copy-id -i "$pub" -p "$port" -o "UserKnownHostsFile=$known_file" "$target"
done <<< "$nodes"
