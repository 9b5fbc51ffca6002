"""Benchmarks that print figures: `python -m jaxconcept.bench.fidelity` (masks and samples on toy scenes)."""
