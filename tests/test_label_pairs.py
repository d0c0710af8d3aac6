"""`megadiff data label-pairs`: pairs relabelled by a reward model (DiffusionDPO's
--choice_model) into a NEW set: the preferred latents are the ones the reward scores higher
(checked against a direct decode + score), ties by margin, the input set untouched, and bad
input refused in one line."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from conftest import clean_env, read_jsonl, run_cli


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_model):
    from megadiff.models.tiny import TINY_RESOLUTION
    from megadiff.objectives.preference_shards import demo_pair_images, write_pairs

    out = tmp_path_factory.mktemp("lp") / "pairs"
    write_pairs(out, demo_pair_images(10, TINY_RESOLUTION, seed=5), tiny_model, TINY_RESOLUTION, 32)
    return out


@pytest.fixture(scope="module")
def reward(tmp_path_factory):
    from megadiff.rewards.tiny import make_tiny_reward

    return make_tiny_reward("clip", tmp_path_factory.mktemp("lp_reward") / "clip", seed=4)


def _digest(root):
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _args(pairs, model, reward, out, *extra):
    return ["data", "label-pairs", str(pairs), "--model", str(model), "--choice-model", "clip",
            "--reward-path", reward.path, "--reward-arch", reward.arch, "--out", str(out), *extra]


def test_label_pairs_puts_the_higher_scored_image_first_in_a_new_set(pairs, tiny_model, reward, tmp_path):
    from megadiff.data.verify import iter_samples, verify_set
    from megadiff.models import sd3
    from megadiff.rewards.registry import load_reward
    from megadiff.rewards.scoring import decode_for_reward

    before = _digest(pairs)
    out = tmp_path / "relabelled"
    r = run_cli(_args(pairs, tiny_model, reward, out), env=clean_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert _digest(pairs) == before                           # the input is never modified
    src, new = list(iter_samples(pairs)), list(iter_samples(out))
    assert len(new) == len(src) == 10
    vae, model = sd3.load_vae(tiny_model), load_reward(reward)
    flips = 0
    for a, b in zip(src, new):
        lat = torch.stack([torch.from_numpy(a[k].astype(np.float32)) for k in ("latents_w", "latents_l")])
        with torch.no_grad():
            s = model(decode_for_reward(vae, lat), [a["caption"]] * 2)
        flipped = bool(s[1] > s[0])
        flips += flipped
        want_w, want_l = (a["latents_l"], a["latents_w"]) if flipped else (a["latents_w"], a["latents_l"])
        assert np.array_equal(b["latents_w"], want_w) and np.array_equal(b["latents_l"], want_l)
        assert b["label_w"] == 1.0 and b["caption"] == a["caption"]
        assert np.array_equal(b["prompt_embeds"], a["prompt_embeds"])
    log = read_jsonl(out / "labels.jsonl")
    assert sum(x["verdict"] == "flip" for x in log) == flips
    assert all((x["score_w"] > x["score_l"]) == (x["verdict"] == "keep") for x in log)
    assert verify_set(out, full=True).ok
    build = json.loads((out / "megadiff_build.json").read_text())
    assert build["builds"][0]["settings"]["choice_model"] == "clip"
    # a margin larger than every gap: all ties, kept at 0.5 or dropped
    gap = max(abs(x["score_w"] - x["score_l"]) for x in log)
    ties = tmp_path / "ties"
    r = run_cli(_args(pairs, tiny_model, reward, ties, "--tie-margin", str(gap * 1.01 + 1e-6)), env=clean_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert [x["label_w"] for x in iter_samples(ties)] == [0.5] * 10


def test_label_pairs_refuses_its_input_as_output_and_non_pair_sets(pairs, tiny_model, reward, tiny_shards, tmp_path):
    r = run_cli(_args(pairs, tiny_model, reward, pairs), env=clean_env())
    assert r.returncode == 2 and "new directory" in r.stderr.strip().splitlines()[-1]
    r = run_cli(_args(tiny_shards, tiny_model, reward, tmp_path / "x"), env=clean_env())
    assert r.returncode == 2 and "megadiff.train set" in r.stderr.strip().splitlines()[-1]
