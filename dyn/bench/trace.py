"""Request traces: Mooncake JSONL (with prefix hash ids) and Azure CSV (lengths only).

Both become a list of `TraceRequest` with arrival times in seconds from the
first request. Bad records raise TraceError naming the file, line and field.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

from dyn.errors import DynError

WHERE_TO_GET = ("The public traces: Mooncake conversation_trace.jsonl from github.com/kvcache-ai/Mooncake "
                "(FAST25-release/traces), Azure LLM inference 2023 CSVs from github.com/Azure/AzurePublicDataset; "
                "benchmarks look in ../shared/traces/ (small slices for tests: tests/data/traces/).")

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per hash id in Mooncake traces."""


class TraceError(DynError):
    """A trace file cannot be read; `path`, `line` (1-based) and `field` locate it."""

    def __init__(self, message: str, *, path: str, line: int | None = None,
                 field: str | None = None) -> None:
        self.path, self.line, self.field = path, line, field
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {field + ': ' if field else ''}{message}")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float
    """Seconds after the trace's first request."""
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = ()
    """One id per `block_tokens` of prompt; empty when the trace has no prefix data."""


@dataclass(frozen=True, slots=True)
class Trace:
    requests: tuple[TraceRequest, ...]
    block_tokens: int
    """Tokens per hash id (512 for Mooncake); 0 when there are no hash ids."""
    source: str


def load_trace(path: str | Path, max_requests: int | None = None) -> Trace:
    """Read a Mooncake .jsonl or an Azure .csv trace (chosen by extension)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return load_mooncake(path, max_requests)
    if suffix == ".csv":
        return load_azure(path, max_requests)
    what = ("a directory" if Path(path).is_dir() else "a file without an extension" if not suffix
            else f"of unknown trace format {suffix!r}")
    raise TraceError(f"is {what}; expected a .jsonl (Mooncake) or .csv (Azure) trace file", path=str(path))


def load_mooncake(path: str | Path, max_requests: int | None = None) -> Trace:
    """Mooncake JSONL: `timestamp` (ms), `input_length`, `output_length`, `hash_ids`."""
    requests = list(iter_mooncake(path, max_requests, ordered=False))
    return _finish(requests, MOONCAKE_BLOCK_TOKENS, path)


def iter_mooncake(path: str | Path, max_requests: int | None = None, *,
                  ordered: bool = True) -> Iterator[TraceRequest]:
    """Records one by one, validated (constant memory: what a 1M-request simulation reads).

    `ordered`: a record earlier than its predecessor is an error (a stream cannot sort)."""
    origin: float | None = None
    last = 0.0
    count = 0
    for line_no, line in enumerate(_open(path), start=1):
        if max_requests is not None and count >= max_requests:
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TraceError(f"not JSON ({err.msg} at column {err.colno})", path=str(path),
                             line=line_no) from None
        if not isinstance(record, dict):
            raise TraceError("expected a JSON object per line", path=str(path), line=line_no)
        timestamp_ms = _number(record, "timestamp", path, line_no)
        input_length = _count(record, "input_length", path, line_no)
        output_length = _count(record, "output_length", path, line_no)
        hash_ids = record.get("hash_ids", [])
        if not isinstance(hash_ids, list) or not all(type(h) is int and h >= 0 for h in hash_ids):
            raise TraceError("must be a list of non-negative ints", path=str(path), line=line_no,
                             field="hash_ids")
        if hash_ids and not (len(hash_ids) - 1) * MOONCAKE_BLOCK_TOKENS < input_length \
                <= len(hash_ids) * MOONCAKE_BLOCK_TOKENS:
            raise TraceError(f"{len(hash_ids)} hash ids do not cover input_length {input_length} "
                             f"in blocks of {MOONCAKE_BLOCK_TOKENS}", path=str(path), line=line_no,
                             field="hash_ids")
        origin = timestamp_ms if origin is None else origin
        arrival_s = (timestamp_ms - origin) / 1000.0
        if ordered and arrival_s < last:
            raise TraceError(f"timestamp {timestamp_ms:g} is earlier than the record before it; "
                             "a streamed trace must be in time order", path=str(path), line=line_no,
                             field="timestamp")
        last = arrival_s
        count += 1
        yield TraceRequest(arrival_s, input_length, output_length, tuple(hash_ids))


def load_azure(path: str | Path, max_requests: int | None = None) -> Trace:
    """Azure LLM inference CSV: TIMESTAMP (wall clock), ContextTokens, GeneratedTokens."""
    requests: list[TraceRequest] = []
    origin: datetime | None = None
    reader = csv.reader(_open(path))
    header = next(reader, None)
    want = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
    if header is None or [h.strip() for h in header[:3]] != want:
        raise TraceError(f"header must start with {','.join(want)}, got {header}", path=str(path), line=1)
    for line_no, row in enumerate(reader, start=2):
        if max_requests is not None and len(requests) >= max_requests:
            break
        if not row:
            continue
        if len(row) < 3:
            raise TraceError(f"expected 3 columns, got {len(row)}", path=str(path), line=line_no)
        try:
            # Seven fractional digits do not fit strptime's %f: keep microseconds.
            stamp = row[0].strip()
            if "." in stamp:
                head, frac = stamp.split(".", 1)
                stamp = f"{head}.{frac[:6]}"
            when = datetime.fromisoformat(stamp)
        except ValueError:
            raise TraceError(f"not a timestamp: {row[0]!r}", path=str(path), line=line_no,
                             field="TIMESTAMP") from None
        record = {"ContextTokens": row[1], "GeneratedTokens": row[2]}
        context = _count(record, "ContextTokens", path, line_no)
        generated = _count(record, "GeneratedTokens", path, line_no)
        origin = when if origin is None else origin
        requests.append(TraceRequest((when - origin).total_seconds(), context, generated))
    return _finish(requests, 0, path)


def _finish(requests: list[TraceRequest], block_tokens: int, path: str | Path) -> Trace:
    if not requests:
        raise TraceError("no requests in trace", path=str(path))
    for prev, cur in zip(requests, requests[1:]):
        if cur.arrival_s < prev.arrival_s:
            requests = sorted(requests, key=lambda r: r.arrival_s)
            break
    return Trace(tuple(requests), block_tokens, str(path))


def _open(path: str | Path):
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            yield from handle
    except FileNotFoundError:
        raise TraceError(f"cannot read trace: no such file. {WHERE_TO_GET}", path=str(path)) from None
    except OSError as err:
        raise TraceError(f"cannot read trace: {err.strerror}", path=str(path)) from None


def _number(record: dict, key: str, path: str | Path, line: int) -> float:
    value = record.get(key)
    if type(value) not in (int, float) or value < 0:
        raise TraceError(f"must be a non-negative number, got {value!r}", path=str(path), line=line,
                         field=key)
    return float(value)


def _count(record: dict, key: str, path: str | Path, line: int) -> int:
    value = record.get(key)
    try:
        count = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        count = -1
    if count < 0 or (isinstance(value, float) and not value.is_integer()):
        raise TraceError(f"must be a non-negative integer, got {value!r}", path=str(path), line=line,
                         field=key)
    return count
