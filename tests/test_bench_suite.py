"""`megadiff bench`: the one-table suite. Its pure parts against hand computations (ZeRO
per-stage bytes, the memory rows' ratios, projections = the formula, FLOP counts equal
torch's counter exactly, forward-time shares from hooks, loss-curve parsing), and one run of
the real command on the sections that launch ranks and trainers (memory at 2 ranks under
ZeRO-0/2/3, the flow-matching recipe's iteration) whose table must be self-consistent."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from megadiff.bench import state_bytes, suite
from megadiff.bench.forward_timer import ForwardTimer, trainer_modules
from megadiff.bench.projection import MODELS, PEAK_TFLOPS, TEXT_TOKENS, flop_agreement, param_count, projections


def test_zero_paper_bytes_by_stage():
    p, n = 1000, 4
    assert state_bytes.zero_paper_bytes(p, n, 0) == 16000
    assert state_bytes.zero_paper_bytes(p, n, 1) == 4000 + 3000
    assert state_bytes.zero_paper_bytes(p, n, 2) == 2000 + 3500
    assert state_bytes.zero_paper_bytes(p, n, 3) == 4000
    assert state_bytes.zero_paper_bytes(p, 1, 3) == state_bytes.zero_paper_bytes(p, 1, 0)


def test_state_tally_counts_each_storage_once_by_category_and_place():
    flat = torch.zeros(100, dtype=torch.bfloat16)                 # 200 B
    groups = {"params": [flat.narrow(0, 0, 50), flat.narrow(0, 50, 50)], "grads": [flat, torch.zeros(10)],
              "master": [None, torch.empty(0)], "buffers": [torch.zeros(4, dtype=torch.float64)]}
    out = state_bytes.tally(groups)
    assert out["params"] == {"device": 0, "host": 200}
    assert out["grads"]["host"] == 40 and out["master"]["host"] == 0 and out["buffers"]["host"] == 32
    assert state_bytes.model_state(out) == 240 and state_bytes.model_state(out, "device") == 0
    assert state_bytes._category("ipg_buckets.x") == "buffers"
    assert state_bytes._category("averaged_gradients") == "grads"
    assert state_bytes._category("fp32_groups_flat_partition") == "master"   # "grad" absent, fp32 wins


def _rec(config, stage, offload, model_state, n_params=1000):
    return {"config": config, "stage": stage, "offload": offload, "n_params": n_params,
            "model_state": model_state, "bytes": {}}


def test_memory_rows_take_the_largest_rank_and_compare_with_both_references():
    recs = {2: [{"configs": [_rec("zero0", 0, False, 16000), _rec("zero3", 3, False, 8100)]},
                {"configs": [_rec("zero0", 0, False, 16000), _rec("zero3", 3, False, 8400)]}]}
    rows, figs = suite.memory_rows(recs)
    z0, z3 = figs
    assert z0["model_state_bytes"] == 16000 and z0["ideal_16_per_n"] == 8000 and z0["zero_paper_bytes"] == 16000
    assert z3["model_state_bytes"] == 8400 and z3["zero_paper_bytes"] == 8000
    assert rows[1][3] == "1.05x 16B/param/N" and "(1.05x)" in rows[1][4]
    assert rows[0][3] == "2.00x 16B/param/N"


def test_projections_equal_the_formula():
    from megadiff.flops import model_flops_per_sample

    params = {"SD3-M": 2_000_000_000, "SD3.5-M": 2_200_000_000, "SD3.5-L": 8_000_000_000}
    ps = projections(mfu=0.5, world=4, params=params)
    assert len(ps) == 2 * 3 * 2 and {p.gpu for p in ps} == {"A100", "H100"}
    for p in ps:
        f = model_flops_per_sample(MODELS[p.model], p.resolution // 8, p.resolution // 8, TEXT_TOKENS, True)
        assert p.flops_per_sample == f
        assert p.samples_per_s == pytest.approx(0.5 * PEAK_TFLOPS[p.gpu] * 1e12 / f, rel=1e-12)
        assert p.state_bytes_per_gpu == 16 * params[p.model] / 4
    assert PEAK_TFLOPS == {"A100": 312.0, "H100": 989.0}
    with pytest.raises(ValueError, match="--mfu 1.5"):
        projections(mfu=1.5, params=params)


def test_param_count_on_meta_equals_the_real_model():
    from diffusers import SD3Transformer2DModel

    from megadiff.models.tiny import tiny_transformer_config

    cfg = tiny_transformer_config()
    assert param_count(cfg) == sum(p.numel() for p in SD3Transformer2DModel(**cfg).parameters())


def test_flop_count_agrees_exactly_with_torch_flop_counter():
    from megadiff.models.tiny import tiny_transformer_config

    r = flop_agreement(dict(tiny_transformer_config(), dual_attention_layers=(0,), qk_norm="rms_norm"), 8, 40)
    assert r["exact"] and r["counted"] > 0 and r["relative_error"] == 0


def test_objective_recipes_cover_every_registered_objective():
    from megadiff.config import _recipe_dict
    from megadiff.registry import OBJECTIVES

    found = suite.objective_recipes()
    assert set(found) == set(OBJECTIVES)
    assert found["flow_matching"] == "tiny-cpu" and found["dmd"] == "tiny-dmd-cpu"
    for obj, recipe in found.items():
        if recipe is not None:
            assert _recipe_dict(recipe)["objectives"][-1] == obj
    rows = suite.objective_rows({"srpo": None, "x": {"recipe": "r", "error": "boom"}})
    assert rows[0][4].startswith("no tiny-*-cpu recipe") and rows[1][2] == "failed"


class _Slow(torch.nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


class _RewardSet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.models = torch.nn.ModuleDict({"hps": _Slow(0.01)})

    def forward(self, x):
        return self.models["hps"](x)


def test_forward_timer_names_every_network_and_times_its_forwards():
    class T:
        pass

    t = T()
    t.engines = {"generator": _Slow(0.02)}
    t.frozen = {"teacher": _Slow(0.0)}
    t.reward_set = _RewardSet()
    t.reward_models = {"clip": _Slow(0.0)}
    t.not_a_net = 3
    mods = trainer_modules(t)
    assert sorted(mods) == ["generator", "reward_models.clip", "reward_set", "reward_set.hps", "teacher"]
    timer = ForwardTimer(mods)
    with timer.hooked():
        t.engines["generator"](1)
        t.engines["generator"](1)
        t.reward_set(1)
    assert timer.calls == {"generator": 2, "teacher": 0, "reward_set": 1, "reward_set.hps": 1,
                           "reward_models.clip": 0}
    assert timer.seconds["generator"] >= 0.04 and timer.seconds["reward_set"] >= timer.seconds["reward_set.hps"] >= 0.01
    t.engines["generator"](1)                      # hooks removed on exit
    assert timer.calls["generator"] == 2
    assert not t.engines["generator"]._forward_hooks and not t.engines["generator"]._forward_pre_hooks


def test_bad_arguments_are_one_line_errors():
    from megadiff.cli import build_parser, run_guarded

    for argv, match in ((["--only", "nope"], "unknown section 'nope'"), (["--configs", "zero9"], "--configs"),
                        (["--mfu", "0"], "--mfu 0"), (["--ranks", "0"], "between 1 and"),
                        (["--run", "/nonexistent"], "has no loss_logs")):
        args = build_parser().parse_args(["bench", *argv])
        with pytest.raises(ValueError, match=match) as e:
            suite.plan(args)
        assert "\n" not in str(e.value)
        assert run_guarded(args.handler, args) == 2


def _fake_run(root: Path) -> Path:
    (root / "loss_logs").mkdir(parents=True)
    recs = [{"iteration": i, "loss/flow": 2.0 / i, "lr/transformer": 1e-4} for i in (1, 2, 3)]
    (root / "loss_logs" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return root


def test_loss_series_reads_every_loss_term():
    from megadiff.bench.plots import loss_series

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        run = _fake_run(Path(tmp) / "myrun")
        assert loss_series(run) == {"myrun:loss/flow": ([1, 2, 3], [2.0, 1.0, 2.0 / 3])}


def test_bench_command_table_is_self_consistent(tmp_path, capsys):
    """The real command on the sections that launch ranks and a trainer: 2 ranks x ZeRO-0/2/3,
    FLOPs, projections, and the flow-matching recipe's iteration."""
    from megadiff.cli import build_parser

    run = _fake_run(tmp_path / "run")
    out = tmp_path / "bench"
    args = build_parser().parse_args(["bench", "--quick", "--only", "memory,flops,objectives,projection",
                                      "--ranks", "2", "--configs", "zero0,zero2,zero3", "--recipes", "tiny-cpu",
                                      "--run", str(run), "--out", str(out), "--mfu", "0.5"])
    args.handler(args)
    text = capsys.readouterr().out
    figs = json.loads((out / "bench.json").read_text())
    mem = {m["config"]: m for m in figs["memory"]}
    assert all(m["ranks"] == 2 and m["model_state_bytes"] > 0 for m in mem.values())
    z0, z2, z3 = (mem[c]["model_state_bytes"] for c in ("zero0", "zero2", "zero3"))
    assert z3 < z2 < z0
    p = mem["zero3"]["n_params"]
    assert z0 == pytest.approx(16 * p, rel=0.01)                      # ZeRO-0 holds everything
    assert z2 == pytest.approx(2 * p + 14 * p / 2, rel=0.02)          # ZeRO paper, stage 2
    assert 8 * p <= z3 <= 1.15 * 8 * p                                # 16 B/param / 2 ranks (+ persistent)
    assert all(f["exact"] for f in figs["flops"])
    for pr in figs["projection"]:
        assert pr["samples_per_s_per_gpu"] == pytest.approx(
            0.5 * pr["peak_tflops"] * 1e12 / pr["train_flops_per_sample"], rel=1e-12)
    fm = figs["objectives"]["tiny-cpu"]
    assert fm["networks_stepped"] == ["transformer"] and fm["step_s"] > 0
    assert 0 < fm["forward_share"]["transformer"] < 1
    assert fm["forward_s"]["transformer"] + fm["backward_s"] + fm["optimizer_s"] <= sum(fm["steps"]) / len(fm["steps"]) * 1.001
    assert "PROJECTED H100 SD3.5-L 1024 px" in text and "not measured" in text
    assert "zero3 at 2 rank(s)" in text and "exact" in text
    from PIL import Image

    for name in ("throughput.png", "loss.png"):
        assert Image.open(out / name).size[0] > 100


def test_plots_without_matplotlib_fall_back_to_pil(tmp_path, monkeypatch):
    import builtins

    from PIL import Image

    from megadiff.bench.plots import write_plots

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    run = _fake_run(tmp_path / "run")
    figs = {"projection": [{"gpu": "H100", "model": "SD3-M", "resolution": 512, "samples_per_s_per_gpu": 40.0,
                            "mfu": 0.4}],
            "objectives": {"dmd": {"step_s": 2.0}, "srpo": None}}
    written = write_plots(tmp_path, figs, (str(run),))
    assert [Path(w).name for w in written] == ["throughput.png", "objectives.png", "loss.png"]
    assert all(Image.open(w).size[0] == 900 for w in written)
