"""`megadiff data prompts`, `megadiff data pairs` and `megadiff data inspect`."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_data_support import keys_of, read_streaming, reference, run_job

from megadiff.data.encode import sample_seed
from megadiff.data.schema import ShardSetInfo
from megadiff.data.verify import verify_set
from megadiff.data.images import pil_to_tensor
from megadiff.models import sd3

PROMPTS = ["a photo of a cat", "", "an astronaut riding a horse", "   ",
           "a watercolor painting of a lake", "a red square"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "t2i-prompts.txt"
    raw = "\n".join(PROMPTS).encode() + b"\n\xff\xfe broken line\nlast one without newline"
    path.write_bytes(raw)
    return path


def test_prompt_shards_without_model(prompt_file, tmp_path):
    out = tmp_path / "prompts"
    s = run_job("prompts", [str(prompt_file), "--out", str(out), "--slice-size", "3"])
    want = [p for p in PROMPTS if p.strip()] + ["last one without newline"]
    assert s["written"] == 5
    assert s["skipped"] == {"empty_line": 2, "bad_text_encoding": 1}
    samples = read_streaming(out)
    assert [x["caption"] for x in samples] == want
    assert set(samples[0]) == {"caption"}
    info = ShardSetInfo.read(out)
    assert (info.schema, info.num_samples, info.text_seq_len) == ("megadiff.prompts", 5, 0)
    assert keys_of(out)[0] == "t2i-prompts.txt:1"
    assert verify_set(out, full=True).ok


def test_prompt_shards_with_cached_embeddings(prompt_file, tmp_path, tiny_model):
    out = tmp_path / "prompt-embeds"
    s = run_job("prompts", [str(prompt_file), "--out", str(out), "--model", str(tiny_model)])
    assert s["written"] == 5
    samples = read_streaming(out)
    text = sd3.load_text_pipeline(tiny_model)
    embeds, pooled = sd3.encode_prompts(text, [x["caption"] for x in samples], 32)
    for i, x in enumerate(samples):
        assert x["prompt_embeds"].dtype == np.float16 and x["prompt_embeds"].shape == (109, 64)
        np.testing.assert_allclose(x["prompt_embeds"].astype(np.float32), embeds[i].numpy(),
                                   rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(x["pooled_prompt_embeds"].astype(np.float32), pooled[i].numpy(),
                                   rtol=1e-3, atol=1e-3)
    info = ShardSetInfo.read(out)
    assert (info.schema, info.text_seq_len, info.text_dim, info.pooled_dim) == (
        "megadiff.prompt_embeds", 109, 64, 64)
    assert verify_set(out, full=True).ok


def _png(colour, size=(72, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory):
    """Rows: label_0 = 1, 0, 0.5 (tie), 0.3 (bad), 1 with a broken jpg_1."""
    path = tmp_path_factory.mktemp("pickapic") / "train-00000.parquet"
    red, blue, green = _png((220, 30, 30)), _png((30, 30, 220)), _png((30, 200, 30), (64, 90))
    table = pa.table({
        "caption": ["red wins", "blue wins", "a tie", "odd label", "broken"],
        "jpg_0": [red, red, green, red, red],
        "jpg_1": [blue, blue, blue, blue, b"\x89PNG broken"],
        "label_0": [1.0, 0.0, 0.5, 0.3, 1.0],
        "label_1": [0.0, 1.0, 0.5, 0.7, 0.0],
        "ranking_id": [10, 11, 12, 13, 14],
    })
    pq.write_table(table, path, row_group_size=2)
    return path, {"red": red, "blue": blue, "green": green}


def _latent_mean(vae, png: bytes) -> np.ndarray:
    pixels = pil_to_tensor(Image.open(io.BytesIO(png)), 64)[None]
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean[0]
    return ((mean - vae.config.shift_factor) * vae.config.scaling_factor).numpy()


def test_pair_shards_drop_ties_and_order_winner_first(pickapic, tmp_path, tiny_model):
    path, imgs = pickapic
    out = tmp_path / "pairs"
    s = run_job("pairs", [str(path), "--model", str(tiny_model), "--out", str(out),
                          "--latents", "mean"])
    assert s["written"] == 2
    assert s["skipped"] == {"tie": 1, "bad_label": 1, "bad_image": 1}
    samples = read_streaming(out)
    assert [x["caption"] for x in samples] == ["red wins", "blue wins"]
    vae = sd3.load_vae(tiny_model)
    red, blue = _latent_mean(vae, imgs["red"]), _latent_mean(vae, imgs["blue"])
    for x, (w, l) in zip(samples, [(red, blue), (blue, red)]):
        np.testing.assert_allclose(x["latents_w"].astype(np.float32), w, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(x["latents_l"].astype(np.float32), l, rtol=1e-3, atol=1e-3)
        assert x["label_w"] == pytest.approx(1.0)
    info = ShardSetInfo.read(out)
    assert (info.schema, info.latent_shape, info.num_samples) == ("megadiff.pairs", (16, 8, 8), 2)
    assert keys_of(out) == ["train-00000.parquet:0", "train-00000.parquet:1"]
    assert verify_set(out, full=True).ok


def test_pair_shards_keep_ties_on_request(pickapic, tmp_path, tiny_model):
    path, imgs = pickapic
    out = tmp_path / "pairs-ties"
    s = run_job("pairs", [str(path), "--model", str(tiny_model), "--out", str(out), "--keep-ties"])
    assert s["written"] == 3 and "tie" not in s["skipped"]
    tie = read_streaming(out)[2]
    assert tie["caption"] == "a tie" and tie["label_w"] == pytest.approx(0.5)
    # sampled latents: the winner's noise is seeded by key#w
    vae = sd3.load_vae(tiny_model)
    pixels = pil_to_tensor(Image.open(io.BytesIO(imgs["green"])), 64)[None]
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    noise = torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(
        sample_seed(0, "train-00000.parquet:2#w")))
    want = ((dist.mean[0] + dist.std[0] * noise - vae.config.shift_factor)
            * vae.config.scaling_factor).numpy()
    np.testing.assert_allclose(tie["latents_w"].astype(np.float32), want, rtol=1e-3, atol=1e-3)


def test_pairs_missing_columns_are_counted(tmp_path, tiny_model):
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [_png((1, 2, 3))]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match="no usable samples.*missing_column 1"):
        run_job("pairs", [str(tmp_path / "p.parquet"), "--model", str(tiny_model), "--out",
                          str(tmp_path / "o")])


def test_inspect_prints_schema_and_decodes_a_grid(tmp_path_factory, tiny_model, tmp_path, capsys):
    ref = reference(tmp_path_factory, tiny_model)
    grid = tmp_path / "grid.png"
    run_job("inspect", [str(ref["out"]), "--captions", "3", "--decode", "5", "--out", str(grid)])
    text = capsys.readouterr().out
    assert "megadiff.train v1, 24 samples, latents 16x8x8" in text
    assert "shards    3," in text
    for _, cap in ref["items"][:3]:
        assert cap in text
    assert ref["items"][3][1] not in text
    img = Image.open(grid)
    assert img.size == (3 * 64, 2 * 64)            # 5 tiles in a 3 x 2 grid
    arr = np.asarray(img)
    assert arr[:64, :64].std() > 0 and arr[64:, 128:].max() == 0   # last cell left empty
    with pytest.raises(ValueError, match="no latents to --decode"):
        out = tmp_path / "p"
        (tmp_path / "p.txt").write_text("a\nb\n")
        run_job("prompts", [str(tmp_path / "p.txt"), "--out", str(out)])
        run_job("inspect", [str(out), "--decode", "1", "--out", str(grid)])
