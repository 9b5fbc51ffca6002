"""Benchmarks that print figures, each a command (`python -m jaxconcept.bench.<name>`):

`speed` (our jitted steps against a PyTorch diffusers reference, same machine and configuration), `memory` (the
steps' memory from the compiled programs' own figures, without weights; docs/memory.md), `jobs` (throughput of
J concept sets in one program, its `--k`, against J separate calls), `fidelity` (masks and samples on toy scenes, the
paper's Fig. 3 in the toy world). Beside them: `workload` (the configs of every benchmarked model and the
prepared data the speed benchmark's two sides share) and `torch_reference` (the PyTorch reference, on
diffusers' and transformers' PyTorch classes; the tests' parity checks use it too).
"""
