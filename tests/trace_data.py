"""Paths of the trace slices shipped in tests/data (provenance and licenses: tests/data/README.md)."""

from pathlib import Path

TRACES = Path(__file__).resolve().parent / "data" / "traces"
MOONCAKE = TRACES / "mooncake" / "conversation_trace_head300.jsonl"
"""The first 300 requests of the Mooncake conversation trace."""
AZURE_CONV = TRACES / "azure-llm-2023" / "AzureLLMInferenceTrace_conv_head200.csv"
"""The first 200 requests of the Azure 2023 conversation trace (CRLF, no final newline)."""
