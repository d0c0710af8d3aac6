"""`megadiff eval`: prompt files, fixed-seed generation from an exported model and from tiny
runs (Euler + CFG for flow matching, the few-step schedule for DMD), CLIP score and reward
means equal to scoring the saved PNGs directly, FID/KID with locally saved Inception weights
(self ~0, another folder > 0, equal to torch-fidelity's own numbers and to the Frechet formula
on the extracted features), the JSON / Markdown tables and `megadiff eval compare`."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import clean_env, run_cli, tiny_train_args

from megadiff.eval import fid, prompts as prompt_files

PROMPTS = ["a red square on a blue background", "a yellow circle", "a green square on white"]


def _eval(argv: list[str]) -> None:
    from megadiff.cli import build_parser

    args = build_parser().parse_args(["eval", *argv])
    args.handler(args)


def _images(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]


def _pixels(latents: torch.Tensor, model: Path) -> list[np.ndarray]:
    from megadiff import validation
    from megadiff.models import sd3

    vae = sd3.load_vae(model, torch.float32)
    return [np.asarray(im) for im in validation.to_pil(sd3.decode_latents(vae, latents))]


def _embeds(model: Path, prompts: list[str], max_len: int = 32):
    from megadiff.models import sd3

    text = sd3.load_text_pipeline(model, torch.float32)
    e, p = sd3.encode_prompts(text, prompts + [""], max_len)
    return e[:-1], p[:-1], e[-1:], p[-1:]


# ---- prompt files ---------------------------------------------------------------------------

def test_prompt_files_of_every_format(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    (tmp_path / "drawbench.csv").write_text('Prompts,Category\n"a cat, sitting",Colors\na dog,Counting\n')
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\tChallenge\na cat\tAnimals\tBasic\n")
    (tmp_path / "list.json").write_text(json.dumps(["a cat", "a dog"]))
    (tmp_path / "rows.jsonl").write_text('{"caption": "a cat"}\n{"prompt": "a dog", "category": "x"}\n')
    (tmp_path / "coco.json").write_text(json.dumps({"annotations": [
        {"image_id": 7, "caption": "a cat "}, {"image_id": 7, "caption": "second caption of 7"},
        {"image_id": 3, "caption": "a dog"}]}))
    read = lambda name, **kw: [(p.text, p.category) for p in prompt_files.read_prompts(tmp_path / name, **kw)]
    assert read("p.txt") == [("a cat", None), ("a dog", None)]
    assert read("drawbench.csv") == [("a cat, sitting", "Colors"), ("a dog", "Counting")]
    assert read("parti.tsv") == [("a cat", "Animals")]
    assert read("list.json", limit=1) == [("a cat", None)]
    assert read("rows.jsonl") == [("a cat", None), ("a dog", "x")]
    assert read("coco.json") == [("a cat", None), ("a dog", None)]


@pytest.mark.parametrize("name, text, match", [
    ("none.txt", None, "does not exist"),
    ("empty.txt", "\n\n", "holds no prompts"),
    ("bad.csv", "title,x\na,b\n", "no prompt column"),
    ("bad.json", "{not json", "not valid JSON"),
    ("obj.json", '{"a": 1}', "without 'annotations'"),
    ("rows.json", '[{"title": "x"}]', "entry 0 has none of the keys"),
])
def test_bad_prompt_files_give_one_line_errors(tmp_path, name, text, match):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        prompt_files.read_prompts(tmp_path / name)
    assert "\n" not in str(e.value)


# ---- FID / KID ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> Path:
    return fid.write_random_inception_weights(tmp_path_factory.mktemp("inception") / "weights.pth", seed=0)


def _noise_folder(root: Path, mean: float, n: int = 4, seed: int = 0) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = np.clip(rng.normal(mean, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"{i:03d}.png")
    return root


def _frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """Heusel et al. 2017 in float64, independent of torch-fidelity's code: Tr((S1 S2)^(1/2)) is
    the sum of the square roots of the eigenvalues of S1 S2 (real, >= 0: a product of PSD matrices)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _features(weights: Path, folder: Path) -> np.ndarray:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["64"], feature_extractor_weights_path=str(weights))
    x = torch.from_numpy(np.stack(_images(folder))).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        return net(x)[0].double().numpy()


def test_fid_kid_self_zero_other_positive_and_equal_to_the_library_and_the_formula(tmp_path, inception):
    import torch_fidelity

    a = _noise_folder(tmp_path / "a", 60, seed=0)
    b = _noise_folder(tmp_path / "b", 180, seed=1)
    # 64-d Inception features: FID's 2048-d matrix square root alone takes ~45 s on 2 cores.
    same = fid.fid_kid(a, a, inception, feature_layer="64")
    other = fid.fid_kid(a, b, inception, feature_layer="64")
    assert abs(same["fid"]) < 1e-3 and abs(same["kid_mean"]) < 1e-3
    assert other["fid"] > 1.0 and other["kid_mean"] > 0.01
    assert other["n_generated"] == 4 and other["kid_subset_size"] == 4 and other["resize"] is None
    lib = torch_fidelity.calculate_metrics(
        input1=str(a), input2=str(b), fid=True, kid=True, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(inception), cuda=False, kid_subset_size=4, cache=False,
        feature_layer_fid="64", feature_layer_kid="64",
        verbose=False, save_cpu_ram=True)
    assert other["fid"] == pytest.approx(lib["frechet_inception_distance"], rel=1e-9)
    assert other["kid_mean"] == pytest.approx(lib["kernel_inception_distance_mean"], rel=1e-9)
    assert other["fid"] == pytest.approx(_frechet(_features(inception, a), _features(inception, b)), rel=1e-3)


def test_inception_weights_are_checked_without_unpickling(tmp_path):
    (tmp_path / "trunc.pth").write_bytes(b"PK\x03\x04 truncated")
    torch.save({"layer.weight": torch.zeros(1)}, tmp_path / "other.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"fc.weight": Evil()}, tmp_path / "evil.pth")
    for name, match in (("missing.pth", "do not exist"), ("trunc.pth", "tensor-only state dict"),
                        ("other.pth", "not a state dict of"), ("evil.pth", "tensor-only state dict")):
        with pytest.raises(ValueError, match=match) as e:
            fid.check_inception_weights(tmp_path / name)
        assert "\n" not in str(e.value)


# ---- generation from an exported model ------------------------------------------------------

@pytest.fixture(scope="module")
def rewards(tmp_path_factory):
    tiny = pytest.importorskip("megadiff.rewards.tiny")
    root = tmp_path_factory.mktemp("rewards")
    clip = tiny.make_tiny_reward("clip", root / "clip")
    hps = tiny.make_tiny_reward("hpsv2", root / "hps")
    spec = root / "rewards.yaml"
    spec.write_text(yaml.safe_dump([dataclasses.asdict(hps)]))
    return clip, hps, spec


def test_eval_model_euler_cfg_images_scores_fid_and_tables(tmp_path, tiny_model, inception, rewards):
    clip, hps, spec = rewards
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("Prompts,Category\n" + "\n".join(f'"{p}",{"shape" if "square" in p else "round"}'
                                                        for p in PROMPTS) + "\n")
    ref = _noise_folder(tmp_path / "ref", 120, n=4)
    out = tmp_path / "eval"
    _eval(["--model", str(tiny_model), "--prompts", str(prompts), "--out", str(out), "--steps", "2",
           "--guidance-scale", "3.0", "--seed", "5", "--batch-size", "2", "--rewards", str(spec),
           "--clip", clip.path, "--clip-arch", clip.arch, "--fid-reference", str(ref),
           "--inception", str(inception), "--fid-features", "64"])
    doc = json.loads((out / "eval.json").read_text())
    pngs = _images(out / "images")
    assert len(pngs) == 3 and (out / "grid.png").is_file() and not (tmp_path / "eval.partial").exists()
    assert json.loads((out / "prompts.json").read_text()) == PROMPTS

    # Hand computation: prompt i from seed 5 + i, Euler 2 steps at the scheduler's shift, CFG 3.
    from megadiff import sampling
    from megadiff.eval.generate import initial_noise
    from megadiff.models import sd3

    e, p, ne, npool = _embeds(tiny_model, PROMPTS)
    noise = torch.cat([torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(5 + i))
                       for i in range(3)])
    assert torch.equal(noise, initial_noise(3, 16, 8, 8, 5))
    net = sd3.load_transformer(tiny_model).eval()
    lat = sampling.euler_sample(net, noise, e, p, 2, 3.0, 3.0, ne.expand(3, -1, -1), npool.expand(3, -1))
    for got, want in zip(pngs, _pixels(lat, tiny_model)):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1     # batches of 2 vs 3

    # Scores: the mean over the saved PNGs, scored directly by the reward package.
    from megadiff.eval.generate import to_tensor
    from megadiff.rewards.registry import load_reward

    x = to_tensor([Image.open(out / "images" / f"{i:03d}.png") for i in range(3)])
    with torch.no_grad():
        h = load_reward(hps, "cpu", torch.float32)(x, PROMPTS)
        cm = load_reward(clip, "cpu", torch.float32)
        cos = (torch.nn.functional.normalize(cm.image_features(x), dim=-1)
               * torch.nn.functional.normalize(cm.text_features(PROMPTS), dim=-1)).sum(-1)
    m = doc["metrics"]
    assert m["hpsv2"] == pytest.approx(h.mean().item(), abs=1e-5)
    assert m["clip_score"] == pytest.approx((100 * cos.clamp(min=0)).mean().item(), abs=1e-3)
    assert [im["hpsv2"] for im in doc["images"]] == pytest.approx(h.tolist(), abs=1e-5)
    assert [im["seed"] for im in doc["images"]] == [5, 6, 7]
    assert doc["per_category"]["shape"]["n"] == 2
    assert doc["per_category"]["shape"]["hpsv2"] == pytest.approx((h[0] + h[2]).item() / 2, abs=1e-5)
    assert m["fid"] > 0 and doc["fid_kid"]["n_generated"] == 3 and doc["fid_kid"]["n_reference"] == 4
    assert doc["source"]["sampler"] == "euler" and doc["source"]["guidance_scale"] == 3.0
    md = (out / "eval.md").read_text()
    assert "| clip_score |" in md and "| hpsv2 |" in md and "| fid |" in md and "## per category" in md

    # Same seed, other batch size: the same images (noise depends on prompt and seed only).
    out2 = tmp_path / "eval2"
    _eval(["--model", str(tiny_model), "--prompts", str(prompts), "--out", str(out2), "--steps", "2",
           "--guidance-scale", "3.0", "--seed", "5", "--batch-size", "3"])
    for a, b in zip(pngs, _images(out2 / "images")):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_eval_refuses_bad_input_before_any_work(tmp_path, tiny_model, inception):
    from megadiff.cli import build_parser, run_guarded

    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    base = ["eval", "--model", str(tiny_model), "--prompts", str(tmp_path / "p.txt")]
    cases = [
        (["eval", "--prompts", "p.txt", "--out", "o"], "needs --run or --model"),
        (base + ["--out", str(tmp_path / "busy")], "already exists and is not empty"),
        (base + ["--out", str(tmp_path / "o"), "--fid-reference", str(tmp_path)], "need both"),
        (base + ["--out", str(tmp_path / "o"), "--fid-reference", str(tmp_path), "--inception",
                 str(tmp_path / "none.pth")], "do not exist"),
        (base + ["--out", str(tmp_path / "o"), "--rewards", "hpsv2"], "give kind=path"),
        (base + ["--out", str(tmp_path / "o"), "--resolution", "30"], "multiple of 16"),
        (base + ["--out", str(tmp_path / "o"), "--step", "3"], "--step selects a checkpoint"),
        (["eval", "--run", str(tmp_path), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")],
         "args.json is missing"),
        (["eval", "compare", str(tmp_path), str(tmp_path)], "eval.json does not exist"),
    ]
    for argv, match in cases:
        args = build_parser().parse_args(argv)
        with pytest.raises(ValueError, match=match) as e:
            args.handler(args)
        assert "\n" not in str(e.value)
        assert run_guarded(args.handler, args) == 2
    assert not (tmp_path / "o").exists()


# ---- runs: flow matching (two steps, compared) and DMD (few-step schedule) -----------------

@pytest.fixture(scope="module")
def flow_run(tiny_model, tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_flow") / "run"
    r = run_cli(tiny_train_args(tiny_model, tiny_shards, out, "train.max_steps=4", "train.save_interval=2",
                                "train.sample_interval=0"),
                env=clean_env(OMP_NUM_THREADS="1"), module="megadiff.train")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_eval_two_steps_of_a_run_and_compare(tmp_path, flow_run, tiny_model):
    from megadiff import sampling
    from megadiff.engine.export import consolidated_state_dict
    from megadiff.engine.run_dir import RunDir
    from megadiff.models import sd3

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    outs = {}
    for step in (2, 4):
        outs[step] = tmp_path / f"step{step}"
        _eval(["--run", str(flow_run), "--step", str(step), "--prompts", str(tmp_path / "p.txt"),
               "--out", str(outs[step]), "--steps", "2", "--guidance-scale", "2.0"])
        doc = json.loads((outs[step] / "eval.json").read_text())
        assert doc["source"]["checkpoint"] == f"step-{step}" and doc["source"]["step"] == step
        assert doc["source"]["network"] == "transformer" and doc["source"]["sampler"] == "euler"
        # The checkpoint's consolidated weights, sampled by hand, give the saved pixels.
        net = sd3.load_transformer(tiny_model).eval()
        net.load_state_dict(consolidated_state_dict(RunDir(flow_run), f"step-{step}", "transformer"))
        e, p, ne, npool = _embeds(tiny_model, PROMPTS[:2])
        noise = torch.cat([torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(i))
                           for i in range(2)])
        lat = sampling.euler_sample(net, noise, e, p, 2, 3.0, 2.0, ne.expand(2, -1, -1), npool.expand(2, -1))
        for got, want in zip(_images(outs[step] / "images"), _pixels(lat, tiny_model)):
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert not all(np.array_equal(a, b) for a, b in zip(_images(outs[2] / "images"), _images(outs[4] / "images")))

    # compare: metrics side by side with B - A (fabricated metrics to check the arithmetic).
    for step, val in ((2, 10.0), (4, 12.5)):
        doc = json.loads((outs[step] / "eval.json").read_text())
        doc["metrics"] = {"hpsv2": val / 100, "fid": 50.0 - val}
        (outs[step] / "eval.json").write_text(json.dumps(doc))
    cmp_dir = tmp_path / "cmp"
    _eval(["compare", str(outs[2]), str(outs[4]), "--out", str(cmp_dir)])
    md = (cmp_dir / "compare.md").read_text()
    assert "| hpsv2 | 0.1000 | 0.1250 | 0.0250 | B |" in md
    assert "| fid | 40.0000 | 37.5000 | -2.5000 | B |" in md       # lower FID is better
    assert "run@step-2" in md and "run@step-4" in md
    sheet = Image.open(cmp_dir / "side_by_side.png")
    assert sheet.size == (2 * 64, 2 * 64)


def test_eval_dmd_run_uses_the_generators_few_step_schedule(tmp_path, tiny_model, tiny_shards):
    from megadiff import generator as gen
    from megadiff.engine.export import consolidated_state_dict
    from megadiff.engine.run_dir import RunDir
    from megadiff.models import sd3

    run = tmp_path / "dmd"
    r = run_cli(["--recipe", "tiny-dmd-cpu", "--output-dir", str(run), "demo.enabled=false",
                 f"model.path={tiny_model}", f"data.local={tiny_shards}", "model.max_sequence_length=32",
                 "train.max_steps=2", "train.save_interval=2", "train.log_interval=1",
                 "logging.wandb_mode=disabled", "validation.num_inference_steps=2", "dmd.update_ratio=2",
                 "dmd.generator.num_steps=2", "dmd.teacher_steps=4", "train.sample_interval=0"],
                env=clean_env(OMP_NUM_THREADS="1"), module="megadiff.train")
    assert r.returncode == 0, r.stderr[-3000:]
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    _eval(["--run", str(run), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "e2")])
    src = json.loads((tmp_path / "e2" / "eval.json").read_text())["source"]
    assert src["sampler"] == "few_step" and src["network"] == "generator" and src["steps"] == 2
    assert src["sigmas"] == pytest.approx(gen.conditioning_sigmas(2, 1.0).tolist())   # flow.shift 1
    assert src["guidance_scale"] is None and src["sample_type"] == "sde"

    # One step: the image is the generator's x0 from the seed's noise at sigma 1, by hand.
    _eval(["--run", str(run), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "e1"),
           "--steps", "1", "--seed", "3"])
    net = sd3.load_transformer(tiny_model).eval()
    net.load_state_dict(consolidated_state_dict(RunDir(run), "step-2", "generator"))
    e, p, _, _ = _embeds(tiny_model, PROMPTS[:2])
    noise = torch.cat([torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(3 + i))
                       for i in range(2)])
    with torch.no_grad():
        x0 = gen.generator_x0(gen.transformer_velocity(net), noise, 1.0, e, p)
    for got, want in zip(_images(tmp_path / "e1" / "images"), _pixels(x0, tiny_model)):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_a_demo_runs_rewards_resolve_to_the_towers_it_built(tmp_path):
    from megadiff.config import RewardConfig, RunConfig
    from megadiff.eval.source import Source, run_rewards

    cfg = RunConfig()
    cfg.rewards = [RewardConfig(kind="clip", path="demo", name="clip", weight=0.1),
                   RewardConfig(kind="hpsv2", path="/w/hps.pt")]
    done = tmp_path / "demo" / "rewards" / "clip"
    done.mkdir(parents=True)
    (done / "done").write_text(json.dumps({"path": "/r/clip.bin", "arch": "/r/cfg.json", "clip_path": None}))
    src = Source(kind="run", path=tmp_path, base=tmp_path, sampler="euler", steps=1, guidance_scale=1.0,
                 shift=1.0, sigmas=None, max_sequence_length=8, height=8, width=8, channels=16, _cfg=cfg)
    clip, hps = run_rewards(src)
    assert (clip.path, clip.arch, clip.weight, clip.name) == ("/r/clip.bin", "/r/cfg.json", 0.1, "clip")
    assert hps.path == "/w/hps.pt"
    cfg.rewards[1] = RewardConfig(kind="hpsv2", path="demo")
    with pytest.raises(ValueError, match="never built its hpsv2 reward tower"):
        run_rewards(src)
