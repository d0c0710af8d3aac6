"""Shard building and checking, one job per module; each is `megadiff data JOB` and also
`python -m data_tools.MODULE` (the form to hand to launchers: `deepspeed --hostfile H --module
data_tools.build ...`, `torchrun -m data_tools.build ...`, `srun python -m data_tools.build ...`).

  build    images + captions (folder, JSONL/Parquet manifest, WebDataset tar) -> megadiff.train
  prompts  a prompt file, one a line -> megadiff.prompts (or .prompt_embeds with --model)
  pairs    Pick-a-Pic v2 Parquet -> megadiff.pairs (Diffusion-DPO)
  label-pairs  megadiff.pairs relabelled by a reward model (AI feedback) -> a new set
  merge    join complete shard sets into one
  verify   hashes, schema, counts, decoded samples, duplicates; exit 2 when broken
  inspect  schema, counts, captions; --decode N --out grid.png through the VAE
           (module `inspect_shards`: a file named inspect.py would shadow the standard library's)
"""

# job name -> module in this package
JOBS = {"build": "build", "prompts": "prompts", "pairs": "pairs", "merge": "merge",
        "verify": "verify", "inspect": "inspect_shards"}
JOBS["label-pairs"] = "label_pairs"   # relabel megadiff.pairs with a reward model (AI feedback)
