"""Round trips of `megadiff data build`: every input format, read back with a plain
StreamingDataset, equals what the SD3 encoders produce for the same input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_support import (build, by_key, keys_of, read_streaming, reference, write_images,
                               write_manifests)

from megadiff.data.encode import sample_seed
from megadiff.data.schema import SCHEMA_FILE, ShardSetInfo
from megadiff.data.verify import verify_set
from megadiff.data.images import pil_to_tensor
from megadiff.models import sd3


@pytest.fixture(scope="module")
def encoders(tiny_model):
    return sd3.load_vae(tiny_model), sd3.load_text_pipeline(tiny_model)


@pytest.fixture(scope="module")
def formats(tmp_path_factory, tiny_model):
    """12 images as a folder and as each manifest format, all built with --latents mean."""
    root = tmp_path_factory.mktemp("formats")
    items = write_images(root / "imgs", 12, seed=11)
    files = write_manifests(root / "imgs", root / "manifests", items)
    sets = {}
    for name, inputs in [("folder", [root / "imgs"]), *[(k, [v]) for k, v in files.items()]]:
        out = root / f"out-{name}"
        summary = build(inputs, out, tiny_model, "--latents", "mean", "--slice-size", "4")
        sets[name] = {"out": out, "summary": summary}
    return {"root": root, "items": items, "sets": sets}


def test_folder_build_matches_the_encoders(formats, encoders, tiny_model):
    vae, text = encoders
    root, items = formats["root"], formats["items"]
    out = formats["sets"]["folder"]["out"]
    samples = read_streaming(out)
    assert [s["caption"] for s in samples] == [c for _, c in items]
    assert keys_of(out) == [f"imgs/{n}" for n, _ in items]
    info = ShardSetInfo.read(out)
    assert (info.schema, info.latent_shape, info.text_seq_len, info.text_dim, info.pooled_dim,
            info.num_samples) == ("megadiff.train", (16, 8, 8), 77 + 32, 64, 64, 12)
    imgs = [Image.open(root / "imgs" / n) for n, _ in items]
    pixels = torch.stack([pil_to_tensor(im, 64) for im in imgs])
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean
    want = ((mean - vae.config.shift_factor) * vae.config.scaling_factor).numpy()
    embeds, pooled = sd3.encode_prompts(text, [c for _, c in items], 32)
    for i, s in enumerate(samples):
        assert s["latents"].dtype == np.float16 and s["latents"].shape == (16, 8, 8)
        np.testing.assert_allclose(s["latents"].astype(np.float32), want[i], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(s["prompt_embeds"].astype(np.float32), embeds[i].numpy(),
                                   rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(s["pooled_prompt_embeds"].astype(np.float32), pooled[i].numpy(),
                                   rtol=1e-3, atol=1e-3)
        assert (s["width"], s["height"]) == imgs[i].size
    assert formats["sets"]["folder"]["summary"]["written"] == 12
    assert verify_set(out, full=True).ok


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf_parquet", "wds"])
def test_every_input_format_gives_the_folder_build(formats, fmt):
    got = read_streaming(formats["sets"][fmt]["out"])
    want = read_streaming(formats["sets"]["folder"]["out"])
    assert len(got) == len(want) == 12
    assert formats["sets"][fmt]["summary"]["skipped"] == {}
    for g, w in zip(got, want):
        assert g["caption"] == w["caption"] and (g["width"], g["height"]) == (w["width"], w["height"])
        for col in ("latents", "prompt_embeds", "pooled_prompt_embeds"):
            np.testing.assert_allclose(g[col].astype(np.float32), w[col].astype(np.float32),
                                       rtol=2e-3, atol=2e-3)
    report = verify_set(formats["sets"][fmt]["out"])
    assert report.ok, report.format()


def test_parquet_slices_are_whole_row_groups(formats):
    # train.parquet has row groups of 5 rows (12 rows); --slice-size 4 -> slices of 5, 5, 2
    out = formats["sets"]["parquet"]["out"]
    build_rec = json.loads((out / "megadiff_build.json").read_text())
    assert build_rec["parts"] == ["part-00000", "part-00001", "part-00002"]
    counts = [json.loads((out / p / "megadiff_done.json").read_text())["written"]
              for p in build_rec["parts"]]
    assert counts == [5, 5, 2]


def test_sampled_latents_are_mean_plus_std_times_per_key_noise(tmp_path_factory, tiny_model, encoders):
    ref = reference(tmp_path_factory, tiny_model)
    vae, _ = encoders
    for name, _ in ref["items"][:3]:
        key = f"imgs/{name}"
        pixels = pil_to_tensor(Image.open(ref["images"] / name), 64)[None]
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
        noise = torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(
            sample_seed(0, key)))
        want = ((dist.mean[0] + dist.std[0] * noise - vae.config.shift_factor)
                * vae.config.scaling_factor).numpy()
        got = ref["samples"][key]["latents"].astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
        assert not np.allclose(got, ((dist.mean[0] - vae.config.shift_factor)
                                     * vae.config.scaling_factor).numpy(), atol=1e-2)


def test_bf16_encoders_store_float16_close_to_fp32(formats, tiny_model, tmp_path):
    out = tmp_path / "bf16"
    build([formats["root"] / "imgs"], out, tiny_model, "--latents", "mean", "--dtype", "bf16")
    got, want = by_key(out), by_key(formats["sets"]["folder"]["out"])
    for k in want:
        for col in ("latents", "prompt_embeds"):
            assert got[k][col].dtype == np.float16
            a, b = got[k][col].astype(np.float32), want[k][col].astype(np.float32)
            assert np.abs(a - b).max() < 0.1 * max(1.0, np.abs(b).max())
    assert ShardSetInfo.read(out).num_samples == 12


def test_resolution_and_buckets(formats, tiny_model, tmp_path):
    square = tmp_path / "square"
    build([formats["root"] / "imgs"], square, tiny_model, "--resolution", "32")
    assert ShardSetInfo.read(square).latent_shape == (16, 4, 4)
    assert {s["latents"].shape for s in read_streaming(square)} == {(16, 4, 4)}
    bucketed = tmp_path / "buckets"
    build([formats["root"] / "imgs"], bucketed, tiny_model, "--resize", "buckets")
    shapes = {(s["width"], s["height"]): s["latents"].shape for s in read_streaming(bucketed)}
    # buckets at 64 px: 48x80, 64x64, 80x48 (w x h); latents are (16, h/8, w/8)
    assert shapes[(80, 64)] == (16, 8, 8)        # ratio 1.25: nearer 1.0 than 1.67
    assert shapes[(64, 96)] == (16, 10, 6)       # ratio 0.67 -> 48x80
    assert shapes[(100, 100)] == (16, 8, 8)
    assert ShardSetInfo.read(bucketed).latent_shape == (16, 8, 8)   # nominal: the square
    assert verify_set(bucketed, full=True).ok


def test_schema_file_and_build_record(formats):
    out = formats["sets"]["folder"]["out"]
    info = json.loads((out / SCHEMA_FILE).read_text())
    assert info["num_samples"] == 12
    rec = json.loads((out / "megadiff_build.json").read_text())
    (b,) = rec["builds"]
    assert b["job"] == "build" and b["summary"]["written"] == 12 and b["summary"]["shards"] == 3
    assert b["settings"]["resolution"] == 64 and b["settings"]["max_sequence_length"] == 32


def test_inputs_with_the_same_name_get_distinct_keys(tmp_path, tiny_model):
    for parent in ("a", "b"):
        write_images(tmp_path / parent / "imgs", 2, seed=3)
    out = tmp_path / "out"
    s = build([tmp_path / "a" / "imgs", tmp_path / "b" / "imgs"], out, tiny_model)
    assert s["written"] == 4
    assert keys_of(out) == ["a/imgs/000.png", "a/imgs/001.png", "b/imgs/000.png", "b/imgs/001.png"]
    samples = by_key(out)
    # same picture, different key: a different latent draw, the same text embedding
    assert not np.array_equal(samples["a/imgs/000.png"]["latents"], samples["b/imgs/000.png"]["latents"])
    np.testing.assert_array_equal(samples["a/imgs/000.png"]["prompt_embeds"],
                                  samples["b/imgs/000.png"]["prompt_embeds"])
    assert verify_set(out).ok
