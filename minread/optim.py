"""Muon: momentum orthogonalised by Newton-Schulz, for weight matrices and conv filters.

Adam scales each coordinate of the gradient on its own. Muon (Keller Jordan, 2024,
github.com/KellerJordan/Muon) treats a weight W (out, in) as the linear map it is: it
keeps a Nesterov momentum M of the gradient and steps along the semi-orthogonal matrix
nearest to M (U V^T for M = U S V^T), so every direction the gradient points in moves
at the same rate instead of the few largest dominating. U V^T comes from five steps of a
quintic Newton-Schulz iteration (matrix products only, no SVD), tuned to push all
singular values into roughly [0.7, 1.2] rather than to exactly 1.

Conv filters (out, in, kt, kh, kw) are flattened to (out, in*kt*kh*kw), as Muon's
CIFAR-10 speed runs do. Biases and norm gains are not maps; they stay with AdamW
(`split_params`). The step is scaled by 0.2 * sqrt(max(out, in)), which gives it the
root-mean-square of an AdamW step (Moonlight, arXiv 2502.16982), so AdamW's learning
rate and schedule carry over unchanged.

torch.optim.Muon (torch >= 2.9) does the same for 2D weights only, iterating in
bfloat16; CPUs without bfloat16 units run that slower than float32, so this one iterates
in float32 and takes filters of any shape. tests/test_optim.py checks it against an SVD
and against torch.optim.Muon on a matrix.
"""

import math

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)   # quintic Newton-Schulz coefficients (Muon's)


def orthogonalize(G, steps=5, eps=1e-7):
    """Approximate U V^T of G = U S V^T (2D, float32) by Newton-Schulz iteration."""
    a, b, c = NS_COEFFS
    tall = G.shape[0] > G.shape[1]
    X = G.T if tall else G                                  # iterate on the short side's Gram matrix
    X = X / (X.norm() + eps)                                # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """Muon for parameters with two or more dimensions (each flattened to (shape[0], -1))."""

    def __init__(self, params, lr=1e-3, momentum=0.95, nesterov=True, weight_decay=0.0, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"Muon takes weight matrices and filters; got a parameter of shape "
                                     f"{tuple(p.shape)} (give biases and norms to AdamW: see split_params)")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, m = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                buf = state["momentum"]
                buf.lerp_(p.grad, 1 - m)
                update = p.grad.lerp(buf, m) if group["nesterov"] else buf
                G = update.reshape(p.shape[0], -1).float()
                O = orthogonalize(G, group["ns_steps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(O.view_as(p).to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(G.shape)))


def split_params(model):
    """(matrices and filters for Muon, everything else for AdamW) of a module."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
