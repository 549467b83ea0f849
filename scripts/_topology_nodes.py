"""Print one line per SSH node of a topology: `name address port user identity known_hosts`
(`-` for unset). Shared by the rack bring-up scripts; `address: local` nodes are skipped."""

import sys

from dyn.config.loader import load_topology, resolve_file
from dyn.errors import DynError

try:
    topology = load_topology(resolve_file("topology", sys.argv[1]))
except DynError as exc:
    sys.exit(f"error: {exc}")
for node in topology.nodes:
    if node.ssh.is_local:
        continue
    s = node.ssh
    print(node.name, s.address, s.port, s.user or "-", s.identity_file or "-", s.known_hosts or "-")
