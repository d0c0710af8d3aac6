"""`megadiff bench ...`: benchmarks that print figures (never timed tests).

`megadiff bench [--quick]` runs every benchmark and prints one table (`suite`); each section
lives in its own module: `engine` (step overhead vs a bare loop, also `megadiff bench engine`),
`memory_worker` + `state_bytes` (per-rank model-state bytes under any ZeRO stage),
`projection` (FLOP agreement with torch's counter; projected A100/H100 throughput and memory),
`data_loader` (shard-reader samples/s), `cached` (cached latents vs encoding on the fly),
`objective_worker` + `forward_timer` (an objective recipe's iteration time and each network's
forward share), `plots` (PNG). Named benchmarks are listed in `megadiff.bench.cli.BENCHES`.
Helpers shared by benchmarks: `model` (a realistic-width SD3 transformer from config and a
synthetic batch), `loop` (the trainer's iteration, driven without data or a run directory),
`accounting` (ZeRO-3 per-rank model-state bytes by category), `launch` (multi-rank
subprocesses) and `table` (plain-text tables).
"""
