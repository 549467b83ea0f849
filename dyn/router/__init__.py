"""router: block-hash index of worker KV caches, event tracking, scoring policies."""

from dyn.router.errors import KvEventError, NoWorkerError, RouteInputError, RouterError
from dyn.router.events import ApplyResult, KvEventBatch, KvEventTracker, KvSnapshot
from dyn.router.index import TIERS, KvIndex, Overlaps, Tier
from dyn.router.policies import POLICY_NAMES, Policy, RouteContext, make_policy
from dyn.router.predictor import PrefixPredictor
from dyn.router.router import Router
from dyn.router.types import DisaggDecision, RouteChoice, RouteDecision, RouteHints, RouteRequest, WorkerLoad

__all__ = [
    "ApplyResult", "DisaggDecision", "KvEventBatch", "KvEventError", "KvEventTracker", "KvIndex",
    "KvSnapshot", "NoWorkerError", "Overlaps", "POLICY_NAMES", "Policy", "PrefixPredictor",
    "RouteChoice", "RouteContext", "RouteDecision", "RouteHints", "RouteInputError", "RouteRequest", "Router",
    "RouterError", "TIERS", "Tier", "WorkerLoad", "make_policy",
]
