"""Frozen reward models for ReFL / SRPO / SDPO and evaluation: `registry.load_reward(cfg)`,
`registry.RewardSet`; kinds hpsv2 and clip (open_clip_reward.py), pickscore, aesthetic;
`scoring.decode_for_reward` (latents -> [0, 1] images); tiny test towers in `tiny.py`."""
