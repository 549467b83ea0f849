"""Fast replica start: a weight manifest per model, and weights streamed from a live peer.

The flat weight arena lives in `dyn.engine.weight_arena` (the engine owns its weights);
`manifest` describes them, and `server`, `fetch` and `wire` move them over the shuttle
(used by the worker only).
"""
