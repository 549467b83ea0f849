"""Topology and recipe schemas, loading and validation errors."""
