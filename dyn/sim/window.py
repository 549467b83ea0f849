"""What the planner observes between two ticks in the simulator: the daemon's LoadWindow."""

from __future__ import annotations

from dataclasses import dataclass, field

from dyn.planner.policy import LoadWindow
from dyn.sim.workload import SimRequest


@dataclass(slots=True)
class ObservationWindow:
    """Observations between two planner ticks."""

    start_s: float = 0.0
    num: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    out_tokens: int = 0
    num_finished: int = 0
    mean_output: float = 0.0
    last: dict[str, float] = field(default_factory=dict)

    def arrive(self, req: SimRequest) -> None:
        self.num += 1
        self.input_tokens += req.input_tokens

    def first_token(self, req: SimRequest) -> None:
        self.ttft.append(req.first_token_s - req.arrival_s)  # type: ignore[operator]
        self.cached_tokens += req.cached_tokens

    def finish(self, req: SimRequest) -> None:
        self.num_finished += 1
        self.out_tokens += req.output_tokens
        if req.output_tokens > 1 and req.first_token_s is not None:
            self.itl.append((req.finish_s - req.first_token_s) / (req.output_tokens - 1))  # type: ignore[operator]

    def close(self, now: float, num_waiting: int, queued_tokens: int, num_decoding: int = 0) -> LoadWindow:
        if self.num_finished:
            self.mean_output = self.out_tokens / self.num_finished
        window = LoadWindow(now - self.start_s, self.num, self.input_tokens,
                            round(self.mean_output * self.num), self.cached_tokens,
                            tuple(self.ttft), tuple(self.itl), num_waiting, queued_tokens,
                            num_decoding=num_decoding)
        self.last = {"rate": window.request_rate,
                     "ttft_p90_s": _pct(self.ttft, 0.9), "itl_p90_s": _pct(self.itl, 0.9),
                     "hit_rate": self.cached_tokens / self.input_tokens if self.input_tokens else 0.0}
        self.start_s, self.num, self.input_tokens, self.cached_tokens = now, 0, 0, 0
        self.ttft, self.itl, self.out_tokens, self.num_finished = [], [], 0, 0
        return window


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
