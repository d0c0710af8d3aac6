"""`megadiff eval`: generate from a prompt file with fixed seeds and score the images.

`prompts` reads prompt files (text, COCO captions, DrawBench / PartiPrompts lists), `source`
loads what generates (a run's checkpoint or an exported diffusers directory) and its sampler,
`generate` writes the images, `metrics` computes CLIP score and reward means, `fid` FID/KID
with local Inception weights (torch-fidelity), `report` the JSON / Markdown tables and the
side-by-side comparison of two evaluations.
"""
