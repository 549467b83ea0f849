"""dyn: one command that turns a rack of GPU servers into one inference service."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 3
"""Every wire frame starts with it; a peer speaking another version is refused with both numbers.
2: Finish lost its never-set `info` map (a version-1 worker's Finish would fail as an unknown field).
3: TokenChunk may carry the stream's Finish (a version-2 frontend would refuse the field)."""
