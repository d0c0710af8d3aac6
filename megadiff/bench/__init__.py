"""`megadiff bench ...`: benchmarks that print figures (never timed tests).

Each benchmark is one module with `add_arguments(parser)` and `run(args)`, listed in
`megadiff.bench.cli.BENCHES`; `megadiff bench engine` is `megadiff.bench.engine`.
Helpers shared by benchmarks: `model` (a realistic-width SD3 transformer from config and a
synthetic batch), `loop` (the trainer's iteration, driven without data or a run directory),
`accounting` (ZeRO-3 per-rank model-state bytes), `launch` (multi-rank subprocesses) and
`table` (plain-text tables).
"""
