"""Fast replica start: a weight manifest per model, and weights streamed from a live peer.

`arena` and `manifest` are torch-light data (the engine uses them); `server`,
`fetch` and `wire` move weights over the shuttle and are used by the worker only.
"""
