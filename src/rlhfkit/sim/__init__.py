"""Demo and test machinery, not part of a real RLHF run: simulated labelers that rank through the
real feedback server, where a demo run keeps each stage's output, and the demo's report.

The gold judges the simulation and the report score with live in `rlhfkit.eval.gold`.
"""
