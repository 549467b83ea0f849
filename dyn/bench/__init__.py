"""bench: trace reading, prompt synthesis and load generation behind `dyn bench`."""

from dyn.bench.report import BenchReport, RequestResult
from dyn.bench.runner import BenchConfig, BenchError, BenchProgress, run_bench
from dyn.bench.stats import percentile, read_counters, summarize
from dyn.bench.synth import PromptSynthesizer, SynthError
from dyn.bench.trace import Trace, TraceError, TraceRequest, load_azure, load_mooncake, load_trace

__all__ = [
    "BenchConfig", "BenchError", "BenchProgress", "BenchReport", "PromptSynthesizer", "RequestResult",
    "SynthError", "Trace", "TraceError", "TraceRequest", "load_azure", "load_mooncake", "load_trace",
    "percentile", "read_counters", "run_bench", "summarize",
]
