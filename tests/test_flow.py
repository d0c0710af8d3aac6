import math

import torch

from megadiff import flow


def test_flow_matching_loss_matches_hand_computation():
    x0 = torch.tensor([[[[1.0, -1.0]]], [[[0.5, 2.0]]]])     # (2, 1, 1, 2)
    eps = torch.tensor([[[[0.0, 1.0]]], [[[-1.0, 0.0]]]])
    sigma = torch.tensor([0.25, 0.5])
    v_pred = torch.tensor([[[[-1.0, 2.0]]], [[[-1.0, -2.0]]]])
    # targets eps - x0: [-1, 2] and [-1.5, -2]; squared errors: [0, 0] and [0.25, 0]
    assert flow.flow_matching_loss(v_pred, x0, eps, sigma).item() == (0 + 0.125) / 2
    # sigma_sqrt weighting: w = 1/sigma^2 = [16, 4] -> (16*0 + 4*0.125) / 2
    assert math.isclose(flow.flow_matching_loss(v_pred, x0, eps, sigma, "sigma_sqrt").item(), 0.25)
    # cosmap: w = 2 / (pi (1 - 2s + 2s^2)), s = 0.5 -> 4/pi
    expect = (4 / math.pi) * 0.125 / 2
    assert math.isclose(flow.flow_matching_loss(v_pred, x0, eps, sigma, "cosmap").item(), expect, rel_tol=1e-6)


def test_noising_and_x0_prediction_invert_each_other():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    x_t = flow.add_noise(x0, eps, sigma)
    assert torch.allclose(x_t[1], 0.5 * x0[1] + 0.5 * eps[1])
    assert torch.allclose(flow.predict_x0(x_t, sigma, flow.velocity_target(x0, eps)), x0, atol=1e-6)


def test_shift_moves_sigma_toward_noise_and_keeps_endpoints():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    s = flow.shift_sigma(u, 3.0)
    assert torch.allclose(s, torch.tensor([0.0, 0.5, 0.75, 1.0]))


def test_timestep_densities_have_the_right_shape_and_centre():
    g = torch.Generator().manual_seed(0)
    ln = flow.sample_sigmas(20000, "logit_normal", g)
    assert 0 < ln.min() and ln.max() < 1 and abs(ln.median().item() - 0.5) < 0.02
    assert abs(flow.sample_sigmas(20000, "logit_normal", g, logit_mean=1.0).median().item()
               - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02
    uni = flow.sample_sigmas(20000, "uniform", g)
    assert abs(uni.mean().item() - 0.5) < 0.01
    # mode density with scale 0 is uniform: u = 1 - u0
    assert abs(flow.sample_sigmas(20000, "mode", g, mode_scale=0.0).mean().item() - 0.5) < 0.01
    shifted = flow.sample_sigmas(20000, "uniform", g, shift=3.0)
    assert shifted.mean() > 0.6


def test_inference_sigmas_run_from_one_to_zero():
    s = flow.inference_sigmas(4, shift=1.0)
    assert torch.allclose(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
