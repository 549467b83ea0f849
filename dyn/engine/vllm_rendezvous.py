"""vLLM's rendezvous file, marked with its owner so a SIGKILLed worker does not leave it for good.

At one process per engine (tp=1) vLLM starts torch.distributed on a FileStore,
`<temp dir>/vllm_dist_<uuid hex>`. torch removes that file when the group ends; a worker killed
by SIGKILL (chaos, the OOM killer, a lost node's teardown) cannot, and nothing in the name says
whose it is, so every such death leaves one on the node. The engine writes a marker beside it,
`dyn-vllm-store-<pid>`, that names it; a vLLM worker starting on the node removes the files of
markers whose process is gone, as it does for its KV-event sockets.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from dyn.launch.local import pid_alive

STORE = re.compile(r"^vllm_dist_[0-9a-f]{32}$")
"""vLLM's FileStore name (vllm.utils.network_utils.get_file_store_init_method)."""
MARKER = re.compile(r"^dyn-vllm-store-(\d+)$")


def mark_store() -> Path | None:
    """Write this process's marker beside the FileStore of its default torch.distributed group;
    the marker's path, or None where the group has no such store (not started here, tp > 1, TCP)."""
    store = _default_store_path()
    if store is None or not STORE.match(store.name):
        return None
    marker = store.with_name(f"dyn-vllm-store-{os.getpid()}")
    marker.write_text(store.name)
    return marker


def remove_marker(marker: Path) -> None:
    """At a clean exit (torch removes the store itself)."""
    with contextlib.suppress(OSError):
        marker.unlink()


def remove_stores_of_dead_processes(directory: str) -> list[str]:
    """Unlink the FileStores (and markers) in `directory` whose marking process no longer runs
    here; returns the stores removed. Only this user's markers, and only a name of vLLM's form in
    the same directory: a marker in a shared temp dir is not trusted to name any other file."""
    removed = []
    uid = os.getuid()
    for entry in os.listdir(directory):
        match = MARKER.match(entry)
        if match is None or pid_alive(int(match.group(1))):
            continue
        marker = os.path.join(directory, entry)
        try:
            if os.stat(marker).st_uid != uid:
                continue
            with open(marker) as f:
                name = f.read(64).strip()
            if STORE.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, name))
                    removed.append(name)
            os.unlink(marker)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def _default_store_path() -> Path | None:
    try:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return None
        store = dist.distributed_c10d._get_default_store()  # no public accessor; guarded
    except Exception:
        return None
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return Path(store.path) if isinstance(store, dist.FileStore) else None
