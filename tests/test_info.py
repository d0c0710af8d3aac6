import re

from megadiff import flops
from megadiff.models.tiny import tiny_transformer_config
from conftest import run_cli


def test_info_prints_config_deepspeed_params_and_flops(tiny_model):
    from diffusers import SD3Transformer2DModel

    r = run_cli(["info", "--recipe", "tiny-cpu", "--world-size", "2", "data.micro_batch_size=3"])
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "micro_batch_size: 3" in out and '"train_batch_size": 12' in out and '"stage": 3' in out
    n = sum(p.numel() for p in SD3Transformer2DModel(**tiny_transformer_config()).parameters())
    assert f"transformer parameters: {n:,}" in out
    train = flops.model_flops_per_sample(tiny_transformer_config(), 8, 8, 77 + 32, True)
    shown = float(re.search(r"training step ([0-9.]+) MFLOP", out).group(1))
    assert abs(shown * 1e6 - train) / train < 1e-3
