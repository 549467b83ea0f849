"""Pull a model's weight arena from live peers, verified block by block.

    for each peer (the daemon's order: best path first):
        manifest  <- peer            (refused unless it fits our arena and our own manifest)
        for each batch of blocks still missing:
            offer <- peer            (the peer paces batches to its bandwidth share)
            shuttle pull into the arena's block views      (transport checksums)
            xxh3 of each landed block == manifest.block_hashes[i]?   no -> refetch (twice), then next peer
    every tensor's xxh3 == manifest?                          no -> those blocks are missing again

Blocks verified from one peer stay when the next peer (or the disk) finishes
the job, so a peer dying at 90% costs 10%. Nothing here decides what happens
when every peer failed: `FetchResult.complete` says, and the caller reads the
rest from disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from dyn.control.sockets import Security, client_socket
from dyn.errors import ProtocolError
from dyn.shuttle import OfferDescriptor, ReceiverConfig, ShuttleReceiver, TransferError
from dyn.engine.weight_arena import WeightArena
from dyn.weights.manifest import ManifestError, WeightManifest, bad_tensors, block_hash
from dyn.weights.wire import MAX_WEIGHTS_MESSAGE_BYTES, WEIGHTS_CODEC, OfferWeights, WeightsOffered

log = logging.getLogger(__name__)

MAX_REFETCHES = 2
"""Times one block is fetched again from the same peer after a checksum mismatch."""


class PeerError(Exception):
    """One peer could not (or would not) deliver; the fetch moves on to the next."""


@dataclass(frozen=True, slots=True)
class Peer:
    process_id: str
    address: str
    """The peer's WeightServer endpoint."""
    transport: str | None = None
    """The daemon's path choice (shm, tcp, nixl, cuda_ipc); None: the receiver picks."""


@dataclass(frozen=True, slots=True)
class FetchConfig:
    batch_bytes: int = 64 << 20
    request_timeout_s: float = 30.0
    """An offer reply may wait on the peer's pacer; a dead peer is noticed after this."""
    stall_timeout_s: float = 3.0
    """A pull with no bytes for this long fails (a peer killed mid-stream)."""
    credit_bytes: int = 32 << 20


@dataclass(slots=True)
class FetchResult:
    manifest: WeightManifest | None
    have: set[int] = field(default_factory=set)
    """Arena blocks written and verified."""
    peers_used: list[str] = field(default_factory=list)
    transport: str = ""
    num_bytes: int = 0
    seconds: float = 0.0
    num_refetched: int = 0
    failures: list[str] = field(default_factory=list)
    """"peer: why", one per peer given up on."""

    @property
    def complete(self) -> bool:
        return self.manifest is not None and len(self.have) == self.manifest.num_blocks


async def fetch_weights(arena: WeightArena, peers: Sequence[Peer], *, key: str,
                        local_manifest: WeightManifest | None = None, security: Security | None = None,
                        config: FetchConfig = FetchConfig(),
                        on_batch: Callable[[str, int], None] | None = None) -> FetchResult:
    """Fill `arena` from `peers` in order; `on_batch(peer_id, blocks_done)` after each batch."""
    security = security or Security()
    result = FetchResult(manifest=local_manifest)
    started = time.perf_counter()
    ctx = zmq.asyncio.Context()
    receiver = ShuttleReceiver(config=ReceiverConfig(credit_bytes=config.credit_bytes,
                                                     stall_timeout_s=config.stall_timeout_s),
                               security=security, ctx=ctx)
    try:
        for peer in peers:
            try:
                await _from_peer(arena, peer, key, result, receiver, ctx, security, config, on_batch)
            except (PeerError, TransferError, ManifestError, ProtocolError) as exc:
                log.warning("weights from %s failed: %s", peer.process_id, exc)
                result.failures.append(f"{peer.process_id}: {exc}")
                continue
            if result.complete:
                wrong = _wrong_blocks(arena, result.manifest)  # type: ignore[arg-type]
                if not wrong:
                    break
                result.have -= wrong
                result.failures.append(f"{peer.process_id}: {len(wrong)} blocks failed the per-tensor check")
    finally:
        result.seconds = time.perf_counter() - started
        await receiver.close()
        ctx.term()
    return result


async def _from_peer(arena: WeightArena, peer: Peer, key: str, result: FetchResult, receiver: ShuttleReceiver,
                     ctx: zmq.asyncio.Context, security: Security, config: FetchConfig,
                     on_batch: Callable[[str, int], None] | None) -> None:
    sock = client_socket(ctx, zmq.DEALER, peer.address, security, max_message_bytes=MAX_WEIGHTS_MESSAGE_BYTES)
    try:
        reply = await _ask(sock, OfferWeights(key=key, manifest=True), config, peer)
        theirs = WeightManifest.from_dict(reply.manifest, f"manifest from {peer.process_id}")
        _check_manifest(theirs, result.manifest, arena, key, peer)
        manifest = result.manifest = theirs
        result.peers_used.append(peer.process_id)
        views = arena.block_views()
        per_batch = max(1, config.batch_bytes // manifest.block_bytes)
        refetches: dict[int, int] = {}
        todo = [i for i in range(manifest.num_blocks) if i not in result.have]
        while todo:
            batch, todo = todo[:per_batch], todo[per_batch:]
            reply = await _ask(sock, OfferWeights(key=key, block_idx=batch), config, peer)
            offer = OfferDescriptor.from_dict(reply.offer)
            transport = peer.transport if peer.transport in offer.transports else None
            stats = await receiver.pull(offer, range(len(batch)), [views[i] for i in batch],
                                        timeout_s=config.request_timeout_s, transport=transport,
                                        expected_hashes=[manifest.block_hashes[i] for i in batch])
            result.transport = stats.transport
            result.num_bytes += stats.num_bytes
            again = []
            for i in batch:
                if block_hash(arena, i) == manifest.block_hashes[i]:
                    result.have.add(i)
                    continue
                refetches[i] = refetches.get(i, 0) + 1
                result.num_refetched += 1
                log.warning("weight block %d from %s failed its checksum (try %d)", i, peer.process_id,
                            refetches[i])
                if refetches[i] > MAX_REFETCHES:
                    raise PeerError(f"block {i} failed its checksum {refetches[i]} times")
                again.append(i)
            todo = again + todo
            if on_batch is not None:
                on_batch(peer.process_id, len(result.have))
    finally:
        sock.close(linger=0)


async def _ask(sock: zmq.asyncio.Socket, request: OfferWeights, config: FetchConfig, peer: Peer) -> WeightsOffered:
    await sock.send(WEIGHTS_CODEC.encode(request))
    try:
        async with asyncio.timeout(config.request_timeout_s):
            data = await sock.recv()
    except TimeoutError:
        raise PeerError(f"no answer from {peer.address} within {config.request_timeout_s:.0f}s") from None
    reply = WEIGHTS_CODEC.decode(data)
    if not isinstance(reply, WeightsOffered):
        raise PeerError(f"unexpected {type(reply).__name__} from {peer.address}")
    if not reply.ok:
        raise PeerError(f"refused: {reply.reason}")
    return reply


def _check_manifest(theirs: WeightManifest, ours: WeightManifest | None, arena: WeightArena, key: str,
                    peer: Peer) -> None:
    if theirs.key != key:
        raise PeerError(f"{peer.process_id} holds weights {theirs.key}, this worker needs {key}")
    if not theirs.matches_layout(arena.layout):
        raise PeerError(f"{peer.process_id}'s arena layout differs from this worker's (other engine version?)")
    if ours is not None and (ours.block_hashes != theirs.block_hashes or ours.tensors != theirs.tensors):
        raise PeerError(f"{peer.process_id}'s manifest differs from the one this node wrote for key {key}")


def _wrong_blocks(arena: WeightArena, manifest: WeightManifest) -> set[int]:
    """Blocks of tensors whose whole-tensor hash disagrees with the manifest."""
    wrong = set(bad_tensors(arena, manifest))
    return {b for slot in arena.layout.slots if slot.name in wrong for b in arena.layout.blocks_of(slot)}
