import pytest
import torch

from minread.optim import Muon, orthogonalize, split_params


def test_newton_schulz_approximates_the_polar_factor():
    torch.manual_seed(0)
    for shape in [(16, 48), (96, 864), (48, 16)]:                   # wide, conv-filter-like, tall
        G = torch.randn(*shape) @ torch.diag(torch.logspace(-1, 1, shape[1]))   # condition ~100
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        O = orthogonalize(G)
        s = torch.linalg.svdvals(O)
        assert O.shape == G.shape
        assert 0.6 < s.min() and s.max() < 1.25                      # every direction about unit size
        cos = (O * (U @ Vh)).sum() / (O.norm() * (U @ Vh).norm())
        assert cos > 0.97                                            # and pointing along U V^T


def test_muon_matches_torch_muon_on_a_matrix():
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = Muon([a], lr=0.01, momentum=0.9, weight_decay=0.1)
    ref = torch.optim.Muon([b], lr=0.01, momentum=0.9, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        g = torch.randn(32, 64)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step(), ref.step()
    step_ours, step_ref = a.detach() - w, b.detach() - w
    # the reference iterates in bfloat16: the steps agree to its precision
    assert (step_ours - step_ref).norm() / step_ref.norm() < 0.03


def test_muon_steps_conv_filters_and_refuses_vectors():
    conv = torch.nn.Conv3d(4, 8, (3, 3, 3))
    filters, rest = split_params(conv)
    assert [p.shape for p in filters] == [conv.weight.shape] and [p.shape for p in rest] == [conv.bias.shape]
    opt = Muon(filters, lr=0.01)
    x = torch.randn(2, 4, 5, 6, 6)
    before = conv.weight.detach().clone()
    conv(x).square().mean().backward()
    opt.step()
    step = (conv.weight.detach() - before).reshape(8, -1)
    rms = step.square().mean().sqrt()
    assert rms == pytest.approx(0.01 * 0.2, rel=0.3)                  # the RMS of an AdamW step of lr 0.01
    with pytest.raises(ValueError, match="AdamW"):
        Muon([conv.bias], lr=0.01)


def test_muon_trains_a_small_conv_net_faster_than_it_starts():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 3, 3, padding=1))
    filters, rest = split_params(net)
    opts = [Muon(filters, lr=0.02), torch.optim.AdamW(rest, lr=0.02)]
    x = torch.randn(8, 3, 12, 12)
    first = None
    for _ in range(60):
        loss = (net(x) - x).square().mean()
        first = first if first is not None else loss.item()
        net.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    assert loss.item() < 0.1 * first
