"""MeZO, MeZO-GV, MeZO-Greedy, LDSD, FZOO, ConMeZO and per-example probes written plainly: every z materialized as a dense tensor.

The reference for qzo's seed-replayed, in-place, fused implementation: same generator,
same seeds (``qzo.zo.optim.step_seed``), textbook arithmetic on fresh copies.
"""

from __future__ import annotations

import math

import torch

from qzo.noise import contract as noise
from qzo.noise.contract import step_seed


class PlainZO:
    """One object per run: ``named`` is a list of (name, tensor) set in place before each evaluation."""

    def __init__(self, named, strategy: str, rule: str, lr: float, eps: float, seed: int, *, pool=4, split=0.5,
                 candidates=4, sigma=1.0, lr_mu=4e-2, beta=0.9, betas=(0.9, 0.999), adam_eps=1e-8, wd=0.0,
                 probes=4, baseline="theta", normalize=None, norm_beta=0.99, clip=None, theta=1.35,
                 cone_beta=0.99, noise_scale=None, noise_scale_steps=None, memory=False, unit=False, subsample=None,
                 mu_init="zero"):
        self.named, self.strategy, self.rule = named, strategy, rule
        self.lr, self.eps, self.seed, self.wd = lr, eps, seed, wd
        self.pool, self.split, self.k, self.sigma, self.lr_mu = pool, split, candidates, sigma, lr_mu
        self.beta, self.betas, self.adam_eps = beta, betas, adam_eps
        self.probes, self.baseline, self.normalize, self.norm_beta, self.clip = probes, baseline, normalize, norm_beta, clip
        self.mean_square, self.norm_t = 0.0, 0
        self.cone_theta, self.cone_beta = theta, cone_beta
        self.theta = {n: t.detach().clone().float() for n, t in named}
        zeros = lambda: {n: torch.zeros_like(v) for n, v in self.theta.items()}
        self.mu, self.m, self.v = zeros(), zeros(), zeros()
        if mu_init == "unit":  # LDSD's mean starts as a seeded direction of norm 1 (qzo.zo.strategies.ldsd.MU_SEED)
            from qzo.zo.strategies.ldsd import MU_SEED

            raw = {n: noise.randn(MU_SEED, noise.stream_id(n), v.numel()).view_as(v).double() for n, v in self.theta.items()}
            norm = math.sqrt(sum(float(r.pow(2).sum()) for r in raw.values()))
            self.mu = {n: (r / norm).float() for n, r in raw.items()}
        self.t = 0
        self.log = []  # per step: (seeds, losses)
        self.noise_scale, self.noise_scale_steps = noise_scale or {}, noise_scale_steps
        self.scales = {n: 1.0 for n in self.theta}
        self.memory, self.unit, self.kept = memory, unit, None  # GV's seed memory and unit-norm v
        self.subsample = subsample  # the share of tensors a step perturbs (qzo.noise.subsample_keys picks them)

    def _scales_at(self, step):
        """Each tensor's noise scale at ``step``: the first matching pattern's, for the first steps only."""
        import fnmatch

        if self.noise_scale_steps is not None and step > self.noise_scale_steps:
            scales = {n: 1.0 for n in self.theta}
        else:
            scales = {n: next((float(v) for p, v in self.noise_scale.items() if fnmatch.fnmatchcase(n, p)), 1.0)
                      for n in self.theta}
        if self.subsample is not None:
            live = [n for n in self.theta if scales[n]]
            keys = dict(zip(live, noise.subsample_keys(self.seed, step, [noise.stream_id(n) for n in live])))
            kept = {n for n in live if keys[n] < self.subsample} or {min(live, key=keys.get)}
            scales = {n: (s if n in kept else 0.0) for n, s in scales.items()}
        return scales

    def _z(self, s):
        return {n: self.scales[n] * noise.randn(s, noise.stream_id(n), v.numel()).view_as(v)
                for n, v in self.theta.items()}

    def _rows(self, closure, delta):
        with torch.no_grad():
            for n, t in self.named:
                t.copy_(self.theta[n] + delta[n])
            return closure()

    def _f(self, closure, delta):
        with torch.no_grad():
            for n, t in self.named:
                t.copy_(self.theta[n] + delta[n])
            return float(closure())

    def step(self, closure, step):
        eps = self.eps
        self.scales = self._scales_at(step)
        lin = lambda terms: {n: sum(c * z[n] for c, z in terms) for n in self.theta}
        zero = {n: torch.zeros_like(v) for n, v in self.theta.items()}
        spread = None
        if self.strategy == "spsa":
            seeds = [step_seed(self.seed, step, 0)]
            z = self._z(seeds[0])
            fp, fm = self._f(closure, lin([(eps, z)])), self._f(closure, lin([(-eps, z)]))
            d, losses = z, [fp, fm]
            g, reported = (fp - fm) / (2 * eps), 0.5 * (fp + fm)
        elif self.strategy == "conmezo":
            seeds = [step_seed(self.seed, step, 0)]
            z = self._z(seeds[0])
            m = self.mu  # the momentum
            norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in m.values()))
            d_count = sum(v.numel() for v in m.values())
            if norm > 0:
                u = {k: math.cos(self.cone_theta) * math.sqrt(d_count) * m[k] / norm
                     + math.sin(self.cone_theta) * z[k] for k in z}
            else:
                u = z
            fp, fm = self._f(closure, lin([(eps, u)])), self._f(closure, lin([(-eps, u)]))
            d, losses = u, [fp, fm]
            g, reported = (fp - fm) / (2 * eps), 0.5 * (fp + fm)
        elif self.strategy == "per_example":
            # closure() -> (per-row token-mean losses, per-row token counts); row i is read at theta + eps z_i
            rows = len(closure()[0])
            seeds = [step_seed(self.seed, step, j) for j in range(rows)]
            zs = [self._z(s) for s in seeds]
            plus, minus, counts = [], [], None
            for i, z in enumerate(zs):
                row_p, counts = self._rows(closure, lin([(eps, z)]))
                row_m, _ = self._rows(closure, lin([(-eps, z)]))
                plus.append(float(row_p[i]))
                minus.append(float(row_m[i]))
            w = [float(c) / float(sum(counts)) for c in counts]
            slopes = [(p - m) / (2 * eps) for p, m in zip(plus, minus)]
            g = math.sqrt(sum(s * s for s in slopes) / rows)
            d = lin([(wi * s / g, z) for wi, s, z in zip(w, slopes, zs)])
            losses, reported = plus + minus, sum(wi * 0.5 * (p + m) for wi, p, m in zip(w, plus, minus))
            spread = [0.5 * (p - m) for p, m in zip(plus, minus)]
        elif self.strategy == "fzoo":
            n = self.probes
            seeds = [step_seed(self.seed, step, j) for j in range(n)]
            zs = [self._z(s) for s in seeds]
            f0 = [self._f(closure, zero)] if self.baseline == "theta" else []
            fs = [self._f(closure, lin([(eps, z)])) for z in zs]
            base, m = (f0[0], n) if f0 else (sum(fs) / n, n - 1)
            # the estimate sum_i (f_i - b) / eps z_i / M, as its magnitude g (RMS of the slopes over
            # M: what normalization and clipping act on) times the direction d
            slopes = [(f - base) / eps for f in fs]
            g = math.sqrt(sum(s * s for s in slopes) / m)
            d = lin([(s / (m * g), z) for s, z in zip(slopes, zs)])
            losses, reported, spread = f0 + fs, base, fs
        elif self.strategy in ("gv", "greedy", "ldsd"):
            n = self.k if self.strategy == "ldsd" else self.pool
            kept = [self.kept] if self.memory and self.kept is not None else []
            seeds = kept + [step_seed(self.seed, step, j) for j in range(n - len(kept))]
            zs = [self._z(s) for s in seeds]
            if self.strategy == "ldsd":
                zs = [{k: self.mu[k] + self.sigma * z[k] for k in z} for z in zs]
            fs = [self._f(closure, lin([(eps, z)])) for z in zs]
            order = sorted(range(n), key=lambda i: fs[i])
            if self.strategy == "gv":
                nb = min(max(1, round(n * self.split)), n - 1)
                best, rest = order[:nb], order[nb:]
                size = math.sqrt(1 / nb + 1 / len(rest)) if self.unit else 1.0  # |coefficients| of v
                d = lin([(1 / nb / size, zs[i]) for i in best] + [(-1 / len(rest) / size, zs[i]) for i in rest])
                if self.memory:
                    self.kept = seeds[best[0]]
                fp, fm = self._f(closure, lin([(eps, d)])), self._f(closure, lin([(-eps, d)]))
                losses = fs + [fp, fm]
            else:
                b = order[0]
                d = zs[b]
                fp, fm = fs[b], self._f(closure, lin([(-eps, d)]))
                losses = fs + [fm]
            g, reported = (fp - fm) / (2 * eps), 0.5 * (fp + fm)
        g = self._normalized(g, spread if spread is not None else losses)
        if self.clip is not None:
            g = max(-self.clip, min(self.clip, g))
        self._update(g, d)
        if self.strategy == "conmezo":
            self.mu = {k: self.cone_beta * self.mu[k] + (1 - self.cone_beta) * g * d[k] for k in self.mu}
        if self.strategy == "ldsd":
            c = [f - (sum(fs) - f) / (n - 1) for f in fs]
            for k in self.mu:
                grad_mu = sum(ci * (z[k] - self.mu[k]) for ci, z in zip(c, zs)) / (n * self.sigma**2)
                self.mu[k] = self.mu[k] - self.lr_mu * grad_mu
        with torch.no_grad():
            for name, t in self.named:
                t.copy_(self.theta[name])
        self.log.append((seeds, losses))
        return reported

    def _normalized(self, g, losses):
        if self.normalize == "spread":
            sigma = float(torch.tensor(losses, dtype=torch.float64).std(unbiased=False))
            return g * self.eps / sigma if sigma > 0 else 0.0
        if self.normalize == "rms":
            self.norm_t += 1
            self.mean_square = self.norm_beta * self.mean_square + (1 - self.norm_beta) * g * g
            return g / math.sqrt(self.mean_square / (1 - self.norm_beta**self.norm_t))
        return g

    def _update(self, g, d):
        self.t += 1
        lr, decay = self.lr, 1 - self.lr * self.wd
        for k in self.theta:
            gd = g * d[k]
            if self.rule == "sgd":
                self.theta[k] = decay * self.theta[k] - lr * gd
            elif self.rule == "momentum":
                self.m[k] = self.beta * self.m[k] + gd
                self.theta[k] = decay * self.theta[k] - lr * self.m[k]
            elif self.rule == "adam":
                b1, b2 = self.betas
                self.m[k] = b1 * self.m[k] + (1 - b1) * gd
                self.v[k] = b2 * self.v[k] + (1 - b2) * gd * gd
                mhat, vhat = self.m[k] / (1 - b1**self.t), self.v[k] / (1 - b2**self.t)
                self.theta[k] = decay * self.theta[k] - lr * mhat / (vhat.sqrt() + self.adam_eps)
            elif self.rule == "sign":
                self.theta[k] = decay * self.theta[k] - lr * torch.sign(gd)
            elif self.rule == "sign_momentum":
                self.m[k] = self.beta * self.m[k] + (1 - self.beta) * gd
                self.theta[k] = decay * self.theta[k] - lr * torch.sign(self.m[k])
            else:
                raise ValueError(self.rule)
        assert all(math.isfinite(float(v.abs().max())) for v in self.theta.values())
