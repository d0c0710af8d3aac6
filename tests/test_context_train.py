"""The extended text context end to end on the tiny model: `megadiff data build --long-context`
caches the extra context with masks; a `context.enabled` run trains transformer + projector in
one engine, resumes bitwise after SIGKILL, and exports the projector beside the diffusers
directory, where the documented loader reproduces the trained conditioning."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_data_support import build, read_streaming
from conftest import kill_after_checkpoint

from conftest import clean_env, read_jsonl, run_cli, tiny_train_args
from megadiff.models import sd3
from megadiff.models.context import encode_long_context, load_context_projector
from megadiff.models.context_train import write_demo_images

CLIP_LEN, T5_LEN, BASE_T5 = 150, 96, 32


@pytest.fixture(scope="module")
def context_shards(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("context")
    items = write_demo_images(root / "imgs", 16, 64, seed=2)
    out = root / "shards"
    build([root / "imgs"], out, tiny_model, "--long-context-clip", str(CLIP_LEN),
          "--long-context-t5", str(T5_LEN), "--latents", "mean")
    return out, items


def context_args(model, shards, out, *extra):
    args = tiny_train_args(model, shards, out, "train.max_steps=6", "train.save_interval=3",
                           "data.micro_batch_size=4", "deepspeed.config=zero3", "optim.schedule=cosine",
                           "optim.warmup_steps=2", f"context.clip_length={CLIP_LEN}",
                           f"context.t5_length={T5_LEN}", *extra)
    args[args.index("tiny-cpu")] = "tiny-context-cpu"
    return args


@pytest.fixture(scope="module")
def ref_run(tiny_model, context_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ctxrun") / "ref"
    r = run_cli(context_args(tiny_model, context_shards[0], out), module="megadiff.train")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def weights(out, tag="step-6"):
    from megadiff.engine.export import consolidated_state_dict
    from megadiff.engine.run_dir import RunDir

    return consolidated_state_dict(RunDir(out), tag, "transformer")


def test_build_caches_long_context_with_masks(context_shards, tiny_model):
    from megadiff.data.schema import ShardSetInfo
    from megadiff.data.verify import verify_set

    out, items = context_shards
    info = ShardSetInfo.read(out)
    assert info.schema == "megadiff.train_context" and info.num_samples == 16
    assert info.context == {"version": 1, "clip_length": CLIP_LEN, "t5_length": T5_LEN,
                            "base_t5_length": BASE_T5, "clip_extra": 77, "t5_extra": T5_LEN - BASE_T5,
                            "clip_dim": 64, "t5_dim": 64}
    assert verify_set(out).ok
    samples = read_streaming(out)
    captions = [s["caption"] for s in samples]
    assert sorted(captions) == sorted(c for _, c in items)
    want = encode_long_context(sd3.load_text_pipeline(tiny_model), captions, CLIP_LEN, T5_LEN, BASE_T5)
    for i, s in enumerate(samples):
        for name in ("clip", "t5"):
            assert s[f"context_{name}"].dtype == np.float16 and s[f"context_{name}_mask"].dtype == np.uint8
            np.testing.assert_array_equal(s[f"context_{name}_mask"].astype(bool),
                                          want[f"{name}_mask"][i].numpy())
            np.testing.assert_allclose(s[f"context_{name}"].astype(np.float32), want[name][i].numpy(),
                                       rtol=1e-3, atol=1e-3)
    clip_real = {int(s["context_clip_mask"].sum()) for s in samples}
    assert 0 in clip_real and len(clip_real) > 2                      # short and long captions


def test_context_run_resumes_bitwise_after_kill(ref_run, tiny_model, context_shards, tmp_path):
    env = clean_env()
    cmd = [sys.executable, "-m", "megadiff.train",
           *context_args(tiny_model, context_shards[0], tmp_path / "k")]
    kill_after_checkpoint(cmd, env, "saved checkpoint")
    assert (tmp_path / "k" / "latest").read_text().strip() == "step-3"
    resumed = subprocess.run(cmd + ["--resume", "auto"], capture_output=True, text=True, env=clean_env(),
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 3 to 6" in resumed.stdout
    a, b = weights(ref_run), weights(tmp_path / "k")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("projector.") for k in a) and any(k.startswith("transformer.") for k in a)
    assert a["projector.clip.fc2.weight"].abs().sum() > 0              # the projector trained
    ref = {r["iteration"]: r["loss/flow"] for r in read_jsonl(ref_run / "loss_logs" / "train.jsonl")}
    res = {r["iteration"]: r["loss/flow"] for r in read_jsonl(tmp_path / "k" / "loss_logs" / "train.jsonl")}
    assert [res[i] for i in (4, 5, 6)] == [ref[i] for i in (4, 5, 6)]
    assert json.loads((ref_run / "args.json").read_text())["context"]["clip_length"] == CLIP_LEN
    assert (ref_run / "samples" / "step-6" / "grid.png").is_file()


def test_export_writes_the_projector_and_it_reproduces_the_trained_conditioning(
        ref_run, tiny_model, context_shards, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from megadiff.config import RunConfig, _build
    from megadiff.models.context import pipeline_conditioning
    from megadiff.models.context_train import load_trained

    r = run_cli(["export", "--run", str(ref_run), "--to", str(tmp_path / "export")])
    assert r.returncode == 0, r.stderr[-2000:]
    projector = load_context_projector(tmp_path / "export" / "context_projector")
    assert projector.config["clip_length"] == CLIP_LEN and projector.config["base_t5_length"] == BASE_T5
    # the run's trained module, rebuilt from the checkpoint (what `megadiff sample` would use)
    cfg = _build(RunConfig, json.loads((ref_run / "args.json").read_text()), "")
    trained = load_trained(cfg, tiny_model, weights(ref_run))
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "export")
    assert all(torch.equal(pipe.transformer.state_dict()[k], v)
               for k, v in trained.transformer.state_dict().items())
    # the shards' cached context through both: the same conditioning, bit for bit
    s = read_streaming(context_shards[0])[:4]
    emb = torch.stack([torch.tensor(x["prompt_embeds"]).float() for x in s])
    context = {k: torch.stack([torch.tensor(x[f"context_{k}"]).float() for x in s]) for k in ("clip", "t5")}
    context |= {f"{k}_mask": torch.stack([torch.tensor(x[f"context_{k}_mask"]) for x in s]).bool()
                for k in ("clip", "t5")}
    with torch.no_grad():
        want, want_mask = trained.extend(emb, context)
        got, got_mask = projector(emb, context)
    assert torch.equal(got, want) and torch.equal(got_mask, want_mask)
    # the pipeline helper: encodes the prompts the same way, and the pipeline runs with it
    prompts = [x["caption"] for x in s[:2]]
    kwargs = pipeline_conditioning(pipe, projector, prompts, guidance_scale=1.0)
    base, pooled = sd3.encode_prompts(pipe, prompts, BASE_T5)
    c = encode_long_context(pipe, prompts, CLIP_LEN, T5_LEN, BASE_T5)
    with torch.no_grad():
        want, want_mask = trained.extend(base, c)
    torch.testing.assert_close(kwargs["prompt_embeds"], want)
    assert torch.equal(kwargs["joint_attention_kwargs"]["encoder_attention_mask"], want_mask)
    kwargs = pipeline_conditioning(pipe, projector, prompts, guidance_scale=3.0, num_images_per_prompt=2)
    assert kwargs["prompt_embeds"].shape[0] == 4
    assert kwargs["joint_attention_kwargs"]["encoder_attention_mask"].shape == (8, want.shape[1])
    images = pipe(**kwargs, guidance_scale=3.0, num_inference_steps=2, height=64, width=64,
                  generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 4 and images[0].size == (64, 64)
