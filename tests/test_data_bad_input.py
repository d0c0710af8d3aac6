"""Bad input is skipped and counted by reason (or stops the build with --on-error fail), and
`verify` finds a damaged set and names the file."""
from __future__ import annotations

import io
import json
import shutil
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_data_support import (add_member, build, keys_of, png_bytes, reference, run_job,
                               write_images)

from megadiff.cli import run_guarded
from megadiff.data.schema import ShardSetInfo
from megadiff.data.verify import verify_set


def _jpeg(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _skipped(out) -> list[dict]:
    return [json.loads(line) for f in sorted(out.glob("*part-*/skipped.jsonl"))
            for line in f.read_text().splitlines()]


def test_bad_files_in_an_image_folder(tmp_path, tiny_model):
    d = tmp_path / "imgs"
    write_images(d, 3, seed=1)                                   # 3 good
    (d / "garbage.png").write_bytes(b"this is not an image at all")
    (d / "garbage.txt").write_text("garbage")
    (d / "truncated.jpg").write_bytes(_jpeg()[:300])
    (d / "truncated.txt").write_text("truncated")
    (d / "nocaption.png").write_bytes(png_bytes())
    (d / "empty.png").write_bytes(png_bytes())
    (d / "empty.txt").write_text("  \n\t")
    (d / "latin1.png").write_bytes(png_bytes())
    (d / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (d / "small.png").write_bytes(png_bytes(size=(20, 30)))
    (d / "small.txt").write_text("small")
    out = tmp_path / "out"
    s = build([d], out, tiny_model, "--min-size", "32", "--slice-size", "4")
    assert s["written"] == 3
    assert s["skipped"] == {"bad_image": 2, "missing_caption": 1, "empty_caption": 1,
                            "bad_text_encoding": 1, "too_small": 1}
    by_reason = {r["key"]: r["reason"] for r in _skipped(out)}
    assert by_reason == {"imgs/garbage.png": "bad_image", "imgs/truncated.jpg": "bad_image",
                         "imgs/nocaption.png": "missing_caption", "imgs/empty.png": "empty_caption",
                         "imgs/latin1.png": "bad_text_encoding", "imgs/small.png": "too_small"}
    assert ShardSetInfo.read(out).num_samples == 3
    assert verify_set(out).ok


def test_bad_lines_in_a_jsonl_manifest(tmp_path, tiny_model):
    (tmp_path / "ok.png").write_bytes(png_bytes())
    lines = [json.dumps({"image": "ok.png", "caption": "a good one"}).encode(),
             b"{not json",
             b"[1, 2, 3]",
             json.dumps({"image": "ok.png"}).encode(),
             json.dumps({"caption": "no image"}).encode(),
             json.dumps({"image": "ok.png", "caption": "caf\u00e9"}).encode().replace(
                 b"\\u00e9", b"\xe9"),                       # raw latin-1 byte in the line
             json.dumps({"image": "missing.png", "caption": "file gone"}).encode(),
             json.dumps({"image": {"bytes": "!!!notbase64"}, "caption": "bad b64"}).encode(),
             json.dumps({"image": "ok.png", "caption": 42}).encode(),
             b"",
             json.dumps({"image": "ok.png", "caption": "another good one"}).encode()]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    s = build([tmp_path / "m.jsonl"], out, tiny_model)
    assert s["written"] == 2
    assert s["skipped"] == {"bad_json": 2, "missing_column": 2, "bad_text_encoding": 1,
                            "bad_image": 2, "bad_caption": 1}
    assert {r["key"] for r in _skipped(out) if r["reason"] == "missing_column"} == {"m.jsonl:4",
                                                                                    "m.jsonl:5"}


def test_parquet_missing_columns_and_column_flags(tmp_path, tiny_model):
    pq.write_table(pa.table({"img": [png_bytes(), png_bytes(colour=(0, 0, 255))],
                             "text": ["red", None]}), tmp_path / "t.parquet")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no usable samples.*missing_column 2"):
        build([tmp_path / "t.parquet"], out, tiny_model)
    assert "t.parquet has no column 'image' or 'caption'" in _skipped(tmp_path / "out.partial")[0]["detail"]
    s = build([tmp_path / "t.parquet"], out, tiny_model, "--image-column", "img",
              "--caption-column", "text")
    assert s["written"] == 1 and s["skipped"] == {"empty_caption": 1}


def test_corrupt_and_truncated_tar_files(tmp_path, tiny_model):
    def make(path, n):
        with tarfile.open(path, "w") as tf:
            for i in range(n):
                add_member(tf, f"s{i}.png", png_bytes(colour=(40 * i, 0, 0)))
                add_member(tf, f"s{i}.txt", f"sample {i}".encode())
            add_member(tf, "orphan.txt", b"a caption without an image")
        return path

    damaged = make(tmp_path / "a-damaged.tar", 4)
    with tarfile.open(damaged) as tf:
        offset = tf.getmember("s1.png").offset
    data = bytearray(damaged.read_bytes())
    data[offset:offset + 100] = b"\xff" * 100               # s1.png's header is garbage
    damaged.write_bytes(bytes(data))
    truncated = make(tmp_path / "b-truncated.tar", 3)
    with tarfile.open(truncated) as tf:
        cut = tf.getmember("s2.png").offset_data + 40
    truncated.write_bytes(truncated.read_bytes()[:cut])     # cut inside s2.png's data
    (tmp_path / "c-notatar.tar").write_bytes(b"hello" * 300)
    corrupt_member = make(tmp_path / "d-badimage.tar", 2)   # s0.png's bytes are not an image
    with tarfile.open(corrupt_member) as tf:
        off = tf.getmember("s0.png").offset_data
    data = bytearray(corrupt_member.read_bytes())
    data[off:off + 60] = b"\x00" * 60
    corrupt_member.write_bytes(bytes(data))
    out = tmp_path / "out"
    s = build([tmp_path], out, tiny_model)
    # damaged: s0 s2 s3 ok; truncated: s0 s1 ok; bad image: s1 ok
    assert s["written"] == 3 + 2 + 1
    assert s["skipped"] == {"corrupt_tar_member": 2, "missing_image": 2, "corrupt_tar": 1,
                            "bad_image": 1}
    reasons = {(r["key"], r["reason"]) for r in _skipped(out)}
    assert ("a-damaged.tar/s1", "corrupt_tar_member") in reasons
    assert ("b-truncated.tar/s2", "corrupt_tar_member") in reasons
    assert ("c-notatar.tar", "corrupt_tar") in reasons
    assert ("d-badimage.tar/s0", "bad_image") in reasons
    assert ("a-damaged.tar/orphan", "missing_image") in reasons
    assert len(keys_of(out)) == 6


def test_on_error_fail_stops_and_names_the_input(tmp_path, tiny_model):
    d = tmp_path / "imgs"
    write_images(d, 2, seed=1)
    (d / "x.png").write_bytes(b"nope")
    (d / "x.txt").write_text("x")
    with pytest.raises(ValueError, match=r"imgs: imgs/x.png: bad_image .*without --on-error fail"):
        build([d], tmp_path / "out", tiny_model, "--on-error", "fail")
    assert not (tmp_path / "out").exists()


def test_user_mistakes_are_value_errors(tmp_path, tiny_model):
    d = tmp_path / "imgs"
    write_images(d, 1)
    cases = [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(d), str(tmp_path / "m.parquet")], "mix formats"),
        ([str(d), "--resolution", "60"], "multiple of 16"),
        ([str(d), "--slice-size", "0"], "--slice-size 0 must be >= 1"),
        ([str(d), "--workers", "0"], "--workers 0 must be >= 1"),
    ]
    pq.write_table(pa.table({"image": [b"x"], "caption": ["x"]}), tmp_path / "m.parquet")
    for argv, msg in cases:
        with pytest.raises(ValueError, match=msg):
            run_job("build", [*argv, "--model", str(tiny_model), "--out", str(tmp_path / "o")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        build([empty], tmp_path / "o", tiny_model)


@pytest.fixture
def copy_of_reference(tmp_path_factory, tiny_model, tmp_path):
    ref = reference(tmp_path_factory, tiny_model)
    out = tmp_path / "set"
    shutil.copytree(ref["out"], out)
    return out


def test_verify_finds_a_corrupted_shard(copy_of_reference):
    out = copy_of_reference
    assert verify_set(out).ok
    shard = out / "part-00001" / "shard.00000.mds"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF                            # same size, one byte flipped
    shard.write_bytes(bytes(data))
    report = verify_set(out)
    assert list(report.problems) == ["part-00001/shard.00000.mds"]
    assert "sha1" in report.problems["part-00001/shard.00000.mds"][0]
    from test_data_support import parse

    import data_tools.verify as job

    assert run_guarded(job.run, parse("verify", [str(out)])) == 2
    with pytest.raises(ValueError, match="1 problem"):
        job.run(parse("verify", [str(out)]))


def test_verify_finds_missing_truncated_duplicated_and_miscounted(copy_of_reference):
    out = copy_of_reference
    (out / "part-00000" / "shard.00000.mds").unlink()
    shard = out / "part-00002" / "shard.00000.mds"
    shard.write_bytes(shard.read_bytes()[:-10])
    keys = out / "part-00001" / "keys.jsonl"
    first = (out / "part-00000" / "keys.jsonl").read_text().splitlines()[0]
    lines = keys.read_text().splitlines()
    keys.write_text("\n".join([first] + lines[1:]) + "\n")
    info = json.loads((out / "megadiff_schema.json").read_text())
    (out / "megadiff_schema.json").write_text(json.dumps({**info, "num_samples": 25}))
    (out / "part-00002" / "shard.00007.mds").write_bytes(b"stray")
    report = verify_set(out)
    p = report.problems
    assert "missing" in p["part-00000/shard.00000.mds"][0]
    assert "bytes, index.json says" in p["part-00002/shard.00000.mds"][0]
    assert "duplicate" in p["part-00001/keys.jsonl"][0]
    assert "num_samples 25, the shards hold 24" in p["megadiff_schema.json"][0]
    assert "not named in index.json" in p["part-00002/shard.00007.mds"][0]
    assert len(p) == 5


def test_verify_decodes_samples_and_checks_shapes(copy_of_reference):
    out = copy_of_reference
    info = json.loads((out / "megadiff_schema.json").read_text())
    (out / "megadiff_schema.json").write_text(json.dumps({**info, "latent_shape": [16, 4, 4]}))
    report = verify_set(out, full=True)
    assert report.decoded == 24
    assert all("latents has shape (16, 8, 8)" in m for msgs in report.problems.values() for m in msgs)
    assert sum(len(m) for m in report.problems.values()) == 24
