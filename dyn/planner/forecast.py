"""Load forecasting for the SLO planner: predict the next interval from the past ones.

A `Forecaster` sees one value per planner interval and predicts the value
`steps` intervals ahead. The default is Holt's linear smoothing (a smoothed
level plus a smoothed trend), which follows a ramp without the lag of a
plain moving average and forgets a spike within a few intervals. Others
plug in through `make_forecaster` or any object with `update`/`predict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from dyn.errors import DynError


class ForecastError(DynError):
    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__((f"{field}: " if field else "") + message)


class Forecaster(Protocol):
    def update(self, value: float) -> None:
        """Feed the value observed over the interval that just ended."""
        ...

    def predict(self, steps: int = 1) -> float:
        """The value expected `steps` intervals ahead (never negative); 0 before any update."""
        ...


@dataclass(slots=True)
class LastValue:
    """Naive forecast: the next interval looks like the last one."""

    value: float = 0.0

    def update(self, value: float) -> None:
        self.value = value

    def predict(self, steps: int = 1) -> float:
        return max(self.value, 0.0)


@dataclass(slots=True)
class HoltForecaster:
    """Double exponential smoothing: level + trend, damped so a trend does not run away.

    level_t = a * x_t + (1 - a) * (level + phi * trend)
    trend_t = b * (level_t - level) + (1 - b) * phi * trend
    predict(h) = level + (phi + ... + phi^h) * trend
    """

    alpha: float = 0.5
    beta: float = 0.3
    phi: float = 0.9
    level: float | None = None
    trend: float = 0.0

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "phi"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ForecastError(f"must be within (0, 1], got {value}", field=name)

    def update(self, value: float) -> None:
        if self.level is None:
            self.level = value
            return
        previous = self.level
        self.level = self.alpha * value + (1 - self.alpha) * (previous + self.phi * self.trend)
        self.trend = self.beta * (self.level - previous) + (1 - self.beta) * self.phi * self.trend

    def predict(self, steps: int = 1) -> float:
        if self.level is None:
            return 0.0
        damped = sum(self.phi ** k for k in range(1, steps + 1))
        return max(self.level + damped * self.trend, 0.0)


FORECASTERS: dict[str, Callable[[], Forecaster]] = {
    "holt": HoltForecaster,
    "last": LastValue,
}


def make_forecaster(name: str) -> Forecaster:
    factory = FORECASTERS.get(name)
    if factory is None:
        raise ForecastError(f"unknown forecaster {name!r}; expected one of {', '.join(FORECASTERS)}",
                            field="forecaster")
    return factory()


@dataclass(frozen=True, slots=True)
class LoadForecast:
    """What the planner expects over the next interval."""

    request_rate: float
    """Requests per second."""
    input_tokens: float
    """Mean prompt length."""
    output_tokens: float
    """Mean output length."""
    hit_rate: float
    """Share of prompt tokens served from prefix caches."""


class LoadPredictor:
    """One forecaster per load signal. Rate gets the trend; lengths and hits are level-like."""

    def __init__(self, forecaster: str = "holt") -> None:
        self.rate = make_forecaster(forecaster)
        self.input_tokens = make_forecaster(forecaster)
        self.output_tokens = make_forecaster(forecaster)
        self.hit_rate = make_forecaster(forecaster)
        self.num_updates = 0

    def update(self, rate: float, input_tokens: float | None, output_tokens: float | None,
               hit_rate: float | None) -> None:
        """Feed one interval; lengths and hits are None when no request finished in it."""
        self.rate.update(rate)
        if input_tokens is not None:
            self.input_tokens.update(input_tokens)
        if output_tokens is not None:
            self.output_tokens.update(output_tokens)
        if hit_rate is not None:
            self.hit_rate.update(hit_rate)
        self.num_updates += 1

    def predict(self, steps: int = 1) -> LoadForecast:
        return LoadForecast(self.rate.predict(steps), self.input_tokens.predict(steps),
                            self.output_tokens.predict(steps), min(self.hit_rate.predict(steps), 1.0))
