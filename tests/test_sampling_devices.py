"""Sampling runs on the device of its noise whatever device the prompt embeddings were kept on
(validation keeps them on the CPU while the transformer sits on the GPU). No second device
exists here, so the noise lives on the `meta` device: every input the transformer receives must
be there too."""
from __future__ import annotations

import pytest
import torch

from megadiff import sampling


def meta_transformer(calls: list):
    def fn(hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict):
        devices = {t.device.type for t in (hidden_states, encoder_hidden_states, pooled_projections, timestep)}
        calls.append(devices)
        assert devices == {"meta"}, devices
        return (torch.zeros_like(hidden_states),)
    return fn


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_euler_sample_moves_cpu_embeddings_to_the_noise_device(guidance):
    calls = []
    noise = torch.empty(2, 4, 8, 8, device="meta")
    emb, pooled = torch.zeros(2, 5, 16), torch.zeros(2, 8)           # CPU, as validation keeps them
    neg, neg_pooled = torch.zeros(2, 5, 16), torch.zeros(2, 8)
    out = sampling.euler_sample(meta_transformer(calls), noise, emb, pooled, 3, 1.0, guidance, neg, neg_pooled)
    assert out.device.type == "meta" and out.shape == noise.shape and len(calls) == 3
