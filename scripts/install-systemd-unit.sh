#!/usr/bin/env bash
# Install scripts/dyn-planner.service as a systemd template unit so a deployment's planner
# daemon is restarted when it dies (workers keep serving; the new daemon adopts them).
#
# Per user (default): ~/.config/systemd/user/dyn-planner@.service, `systemctl --user`.
# --system: /etc/systemd/system/dyn-planner@.service with User= set (run as root).
# With --enable NAME it also enables and starts dyn-planner@NAME (after `dyn up --name NAME`).
set -euo pipefail
usage() {
    cat <<'USAGE'
usage: scripts/install-systemd-unit.sh [--system --user-name USER] [--enable NAME] [--dry-run]
  --system          install system-wide (needs root) for --user-name USER
  --enable NAME     enable and start the unit for deployment NAME
  --dry-run         print every command instead of running it
example: scripts/install-systemd-unit.sh --enable llama-70b --dry-run
USAGE
}
here="$(cd "$(dirname "$0")" && pwd)"
system=0 user_name="" enable="" dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --system) system=1; shift;;
        --user-name) user_name="$2"; shift 2;;
        --enable) enable="$2"; shift 2;;
        --dry-run) dry=1; shift;;
        -h|--help) usage; exit 0;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2;;
    esac
done
run() { if [ "$dry" = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi; }
unit="$here/dyn-planner.service"
if [ "$system" = 1 ]; then
    [ -n "$user_name" ] || { echo "--system needs --user-name USER" >&2; exit 2; }
    home="$(getent passwd "$user_name" | cut -d: -f6)"
    [ -n "$home" ] || { echo "no such user: $user_name" >&2; exit 2; }
    dest=/etc/systemd/system/dyn-planner@.service
    # %h is the manager's home (root's) in a system unit: spell out the user's.
    if [ "$dry" = 1 ]; then
        printf '+ sed s|%%h|%s|g; add User=%s  %s > %s\n' "$home" "$user_name" "$unit" "$dest"
    else
        sed -e "s|%h|$home|g" -e "s|^\[Service\]|[Service]\nUser=$user_name|" "$unit" > "$dest"
    fi
    ctl=(systemctl)
else
    dest="$HOME/.config/systemd/user/dyn-planner@.service"
    run mkdir -p "$(dirname "$dest")"
    run cp "$unit" "$dest"
    ctl=(systemctl --user)
fi
run "${ctl[@]}" daemon-reload
[ -z "$enable" ] || run "${ctl[@]}" enable --now "dyn-planner@$enable"
echo "installed $dest"
