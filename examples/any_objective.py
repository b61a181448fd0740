"""qzo.ZO optimizes any scalar objective, not only a language model's loss.

    python examples/any_objective.py

Fits a linear model by least squares with forward evaluations only (no autograd), then a
non-differentiable objective (the count of misclassified points, a step function).
"""

import torch

import qzo


def main() -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 8, generator=g)
    w_true = torch.randn(8, 1, generator=g)
    y = X @ w_true + 0.01 * torch.randn(256, 1, generator=g)

    w = torch.zeros(8, 1)
    opt = qzo.ZO([("w", w)], rule=qzo.SGD(lr=2e-2), eps=1e-3)
    mse = lambda: ((X @ w - y) ** 2).mean()
    print(f"least squares: start {mse():.4f}")
    for _ in range(500):
        opt.step(mse)
    print(f"least squares: after 500 ZO steps {mse():.4f} ({opt.forwards} evaluations)")

    labels = (X @ w_true > 0).float()
    v = torch.zeros(8, 1)
    errors = lambda: ((X @ v > 0).float() != labels).float().mean()  # piecewise constant: no gradient
    opt = qzo.ZO([("v", v)], rule=qzo.SGD(lr=0.5), eps=0.5)
    print(f"0-1 loss: start {errors():.3f}")
    for _ in range(300):
        opt.step(errors)
    print(f"0-1 loss: after 300 ZO steps {errors():.3f}")


if __name__ == "__main__":
    main()
