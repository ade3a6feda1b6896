"""VICReg terms and DINO's cross-entropy against hand-written references (plain loops over numbers)."""
import math

import pytest
import torch

from medssl.ssl.losses import dino_cross_entropy, vicreg_terms


def reference_vicreg(z1, z2, eps=1e-4):
    """The paper's formulas with loops: v = mean_j max(0, 1 - sqrt(Var(z_j) + eps)), c = sum_{i != j} C_ij^2 / d."""
    n, d = len(z1), len(z1[0])
    inv = sum((z1[i][j] - z2[i][j]) ** 2 for i in range(n) for j in range(d)) / (n * d)
    var_total, cov_total = 0.0, 0.0
    for z in (z1, z2):
        means = [sum(z[i][j] for i in range(n)) / n for j in range(d)]
        hinge = 0.0
        for j in range(d):
            variance = sum((z[i][j] - means[j]) ** 2 for i in range(n)) / (n - 1)  # unbiased, as torch.var
            hinge += max(0.0, 1 - math.sqrt(variance + eps))
        var_total += hinge / d / 2
        for a in range(d):
            for b in range(d):
                if a != b:
                    c = sum((z[i][a] - means[a]) * (z[i][b] - means[b]) for i in range(n)) / (n - 1)
                    cov_total += c * c / d
    return inv, var_total, cov_total


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])  # below 1: the variance hinge is active; above: not
def test_vicreg_terms_match_reference(scale):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g) * scale, torch.randn(6, 5, generator=g) * scale
    terms = vicreg_terms(z1, z2)
    inv, var, cov = reference_vicreg(z1.double().tolist(), z2.double().tolist())
    assert float(terms["invariance"]) == pytest.approx(inv, rel=1e-5)
    assert float(terms["variance"]) == pytest.approx(var, rel=1e-4, abs=1e-7)
    assert float(terms["covariance"]) == pytest.approx(cov, rel=1e-4)


def test_vicreg_limits():
    same = torch.randn(8, 4)
    assert float(vicreg_terms(same, same.clone())["invariance"]) == 0.0
    collapsed = torch.ones(8, 4)  # every embedding the same: std 0, hinge 1 per dimension, no covariance
    terms = vicreg_terms(collapsed, collapsed)
    assert float(terms["variance"]) == pytest.approx(1 - math.sqrt(1e-4), rel=1e-5)
    assert float(terms["covariance"]) == 0.0


def reference_dino(student, teacher, center, ts, tt):
    """sum over pairs i != j of  -sum_k P_t,i(k) log P_s,j(k), averaged over samples and pairs; softmax by hand."""
    def softmax(row):
        top = max(row)
        e = [math.exp(v - top) for v in row]
        return [v / sum(e) for v in e]
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if i == j:
                continue
            per_sample = 0.0
            for t_row, s_row in zip(t, s):
                p_t = softmax([(v - c) / tt for v, c in zip(t_row, center)])
                p_s = softmax([v / ts for v in s_row])
                per_sample += -sum(a * math.log(b) for a, b in zip(p_t, p_s))
            total, pairs = total + per_sample / len(t), pairs + 1
    return total / pairs


@pytest.mark.parametrize("views", [2, 3])
def test_dino_cross_entropy_matches_reference(views):
    g = torch.Generator().manual_seed(1)
    student = [torch.randn(4, 7, generator=g) for _ in range(views)]
    teacher = [torch.randn(4, 7, generator=g) for _ in range(views)]
    center = torch.randn(1, 7, generator=g) * 0.1
    got = float(dino_cross_entropy(student, teacher, center, 0.1, 0.04))
    want = reference_dino([s.double().tolist() for s in student], [t.double().tolist() for t in teacher],
                          center[0].double().tolist(), 0.1, 0.04)
    assert got == pytest.approx(want, rel=1e-5)


def test_dino_gradient_reaches_the_student_only():
    s = [torch.randn(3, 5, requires_grad=True) for _ in range(2)]
    t = [torch.randn(3, 5, requires_grad=True) for _ in range(2)]
    dino_cross_entropy(s, t, torch.zeros(1, 5), 0.1, 0.04).backward()
    assert all(x.grad is not None for x in s) and all(x.grad is None for x in t)
