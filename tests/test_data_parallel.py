"""Parallel and resumable builds: ranks, local workers, job-array parts + merge, a killed build
resumed, append / overwrite / refusal of an output that holds another set."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import clean_env
from test_data_support import (assert_same_samples, build, by_key, keys_of, reference, run_job,
                               write_images)

from megadiff.cli import run_guarded
from megadiff.data.builder import KILL_ENV
from megadiff.data.schema import ShardSetInfo
from megadiff.data.shardset import merge_indexes
from megadiff.data.verify import verify_set


def _cli_build(ref, out, model, env_extra=None, *extra):
    cmd = [sys.executable, "-m", "megadiff.cli", "data", "build", str(ref["images"]), "--model",
           str(model), "--out", str(out), "--slice-size", "8", "--threads", "1", "--no-progress",
           *extra]
    return subprocess.Popen(cmd, env=clean_env(**(env_extra or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_ranks_build_the_same_set_as_one_process(tmp_path_factory, tiny_model, tmp_path):
    ref = reference(tmp_path_factory, tiny_model)
    out = tmp_path / "two-ranks"
    procs = [_cli_build(ref, out, tiny_model, {"RANK": str(r), "WORLD_SIZE": "2",
                                               "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"})
             for r in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert "rank 1 finished its slices" in results[1][1]
    assert "24 samples in 3 shards" in results[0][0]
    assert (out / "index.json").read_text() == (ref["out"] / "index.json").read_text()
    assert keys_of(out) == keys_of(ref["out"])
    assert_same_samples(by_key(out), ref["samples"])
    ranks = [json.loads((out / f"part-0000{i}" / "megadiff_done.json").read_text())["rank"]
             for i in range(3)]
    assert ranks == [0, 1, 0]          # slot k builds slices k, k + 2, ...
    assert not (tmp_path / "two-ranks.partial").exists()


def test_local_workers_build_the_same_set(tmp_path_factory, tiny_model, tmp_path):
    ref = reference(tmp_path_factory, tiny_model)
    out = tmp_path / "workers"
    build([ref["images"]], out, tiny_model, "--slice-size", "8", "--workers", "2")
    assert (out / "index.json").read_text() == (ref["out"] / "index.json").read_text()


def test_merge_of_two_part_builds_equals_a_single_build(tmp_path_factory, tiny_model, tmp_path):
    ref = reference(tmp_path_factory, tiny_model)
    parts = []
    for k in (0, 1):
        out = tmp_path / f"part{k}"
        s = build([ref["images"]], out, tiny_model, "--slice-size", "8", "--part", f"{k}/2")
        assert s["written"] == (16 if k == 0 else 8)        # slices {0, 2} and {1}
        parts.append(out)
    merged = tmp_path / "merged"
    summary = run_job("merge", [*map(str, parts), "--out", str(merged)])
    assert summary["written"] == 24 and summary["shards"] == 3
    assert sorted(keys_of(merged)) == sorted(keys_of(ref["out"]))
    assert_same_samples(by_key(merged), ref["samples"])
    assert ShardSetInfo.read(merged).num_samples == 24
    assert verify_set(merged, full=True).ok
    # inputs were hard-linked, not moved
    assert ShardSetInfo.read(parts[0]).num_samples == 16
    # the same merge again is a no-op; merging sets of other geometry is refused
    assert run_job("merge", [*map(str, parts), "--out", str(merged)])["written"] == 24
    other = tmp_path / "other"
    build([ref["images"]], other, tiny_model, "--resolution", "32", "--slice-size", "24")
    with pytest.raises(ValueError, match="only sets of one schema and geometry merge"):
        run_job("merge", [str(parts[0]), str(other), "--out", str(tmp_path / "bad")])


def test_merge_indexes_matches_streaming_merge_index(tmp_path_factory, tiny_model, tmp_path):
    from streaming.base.util import merge_index

    ref = reference(tmp_path_factory, tiny_model)
    root = tmp_path / "set"
    shutil.copytree(ref["out"], root)
    (root / "index.json").unlink()
    parts = ["part-00000", "part-00001", "part-00002"]
    merge_index([str(root / p / "index.json") for p in parts], str(root))
    theirs = json.loads((root / "index.json").read_text())
    ours = merge_indexes(root, parts)
    assert ours == theirs


def test_killed_build_resumes_without_duplicates_or_holes(tmp_path_factory, tiny_model, tmp_path):
    ref = reference(tmp_path_factory, tiny_model)
    out = tmp_path / "killed"
    staging = tmp_path / "killed.partial"
    p = _cli_build(ref, out, tiny_model, {KILL_ENV: "13"})      # dies inside the second slice
    p.communicate(timeout=300)
    assert p.returncode == -9
    assert not out.exists()                                     # nothing half-built in place
    done = sorted(d.name for d in staging.iterdir() if (d / "megadiff_done.json").is_file())
    assert done == ["part-00000"]
    assert (staging / "part-00001" / "keys.jsonl").is_file()    # the unfinished slice
    stamp = (staging / "part-00000" / "shard.00000.mds").stat().st_mtime_ns
    summary = build([ref["images"]], out, tiny_model, "--slice-size", "8")
    assert summary["written"] == 24
    assert (out / "part-00000" / "shard.00000.mds").stat().st_mtime_ns == stamp   # not rebuilt
    assert keys_of(out) == keys_of(ref["out"])
    assert (out / "index.json").read_text() == (ref["out"] / "index.json").read_text()
    assert_same_samples(by_key(out), ref["samples"])
    report = verify_set(out, full=True)
    assert report.ok, report.format()
    assert not staging.exists()


def test_refuses_another_set_unless_append_or_overwrite(tmp_path_factory, tiny_model, tmp_path):
    ref = reference(tmp_path_factory, tiny_model)
    out = tmp_path / "out"
    shutil.copytree(ref["out"], out)
    more = tmp_path / "more"
    write_images(more, 5, seed=9, start=100)
    with pytest.raises(ValueError, match=r"already holds a different shard set .*--append.*--overwrite"):
        build([more], out, tiny_model)
    # the same build again is a no-op
    assert build([ref["images"]], out, tiny_model, "--slice-size", "8")["written"] == 24
    # append: new parts joined, old ones untouched, keys unique, geometry checked first
    with pytest.raises(ValueError, match="resolution"):
        build([more], out, tiny_model, "--append", "--resolution", "32")
    s = build([more], out, tiny_model, "--append")
    assert s["written"] == 5
    assert ShardSetInfo.read(out).num_samples == 29
    assert len(set(keys_of(out))) == 29
    assert json.loads((out / "megadiff_build.json").read_text())["parts"][-1] == "b1-part-00000"
    assert verify_set(out).ok
    assert build([more], out, tiny_model, "--append")["written"] == 5     # already in: no-op
    assert ShardSetInfo.read(out).num_samples == 29
    # a folder of other files is refused too
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds files but no shard set"):
        build([more], junk, tiny_model)


def test_overwrite_keeps_the_old_set_until_the_new_one_is_complete(tmp_path_factory, tiny_model,
                                                                  tmp_path, capsys):
    ref = reference(tmp_path_factory, tiny_model)
    out = tmp_path / "out"
    shutil.copytree(ref["out"], out)
    more = tmp_path / "more"
    write_images(more, 5, seed=9, start=100)
    (more / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (more / "zz-broken.txt").write_text("a broken image")
    # the new build fails in its second slice: the old set stays in place, whole and valid
    with pytest.raises(ValueError, match=r"zz-broken.png: bad_image .*--on-error fail"):
        build([more], out, tiny_model, "--slice-size", "4", "--overwrite", "--on-error", "fail")
    assert (tmp_path / "out.partial" / "part-00000" / "megadiff_done.json").is_file()
    assert verify_set(out).ok and ShardSetInfo.read(out).num_samples == 24
    # fixed input: other slices, so the unfinished staging is discarded and rebuilt
    (more / "zz-broken.png").unlink()
    assert build([more], out, tiny_model, "--slice-size", "4", "--overwrite")["written"] == 5
    assert "discarding the unfinished build" in capsys.readouterr().err
    assert ShardSetInfo.read(out).num_samples == 5
    assert sorted(keys_of(out)) == [f"more/{100 + i:03d}.{'jpg' if i % 3 == 2 else 'png'}"
                                    for i in range(5)]
    assert not list(tmp_path.glob("out.*"))       # no staging or renamed-aside leftovers


def test_cli_errors_are_one_line_exit_2(tmp_path, tiny_model):
    from test_data_support import parse

    import data_tools.build as job

    args = parse("build", [str(tmp_path / "nope"), "--model", str(tiny_model), "--out",
                           str(tmp_path / "o")])
    assert run_guarded(job.run, args) == 2
    args = parse("build", [str(tmp_path), "--model", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="model_index.json is missing"):
        job.run(args)
