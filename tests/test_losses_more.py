"""The benchmarks' further methods: golden values, properties, terms, pre-activations, configs.

Every golden value is pinned for a fixed seeded input and re-derived here independently (float64
numpy, explicit loops or a different formulation of the reference code), so a pinned number is
known to be the reference formula.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import CONFIGS, FAST
from rank_dump import assert_same_tensors, run_two_ranks
from test_kd import digits_teacher, fit_digits  # noqa: F401 (a fixture)

from distill.cli import build_cli
from distill.losses import (
    ABF,
    CCTerm,
    DISTTerm,
    DKDTerm,
    KDSVDTerm,
    KDTerm,
    NSTTerm,
    OFDTerm,
    Paraphraser,
    ReviewKDTerm,
    Translator,
    VIDRegressor,
    VIDTerm,
    ab_loss,
    cc_loss,
    dist_loss,
    dkd_loss,
    fsp_loss,
    ft_loss,
    hcl_loss,
    kd_loss,
    kdsvd_loss,
    nst_loss,
    ofd_loss,
    ofd_margin,
    vid_loss,
)
from distill.methods import OfflineKD
from distill.models import StagedNet, StagedOutput, create_model
from distill.models.cifar.resnet_bottleneck import BottleneckResNet
from distill.tools.runs import read_metrics

NEW_METHODS = ["cc", "vid", "nst", "kdsvd", "ofd", "reviewkd", "dist", "kd_ls", "dkd_ls", "dist_ls"]


def inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(
        z_s=r(4, 10),
        z_t=3 * r(4, 10) + 1,
        target=torch.tensor([3, 0, 7, 9]),
        f_s=r(4, 8, 4, 4),
        f_t=r(4, 8, 4, 4),
        f_big=r(4, 6, 8, 8),
        e_s=r(4, 16),
        e_t=r(4, 16),
        stages_s=[r(4, 4, 8, 8), r(4, 6, 4, 4), r(4, 8, 4, 4)],
        stages_t=[r(4, 4, 8, 8), r(4, 6, 8, 8), r(4, 8, 4, 4)],
        log_scale=r(8),
        bn_weight=r(8),
        bn_bias=r(8),
        review_s=[r(4, 8, 8, 8), r(4, 12, 4, 4), r(4, 12, 1, 1)],
        review_t=[r(4, 8, 8, 8), r(4, 12, 4, 4), r(4, 12, 1, 1)],
        ofd_s=[r(4, 8, 4, 4), r(4, 6, 2, 2)],
        ofd_t=[r(4, 8, 8, 8), r(4, 6, 2, 2)],
    )


# ---- independent re-derivations (float64 numpy) ------------------------------------------------
def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def block_mean(f: np.ndarray, size: int) -> np.ndarray:
    """Average over k×k blocks down to ``size`` (adaptive average pooling by an integer factor)."""
    b, c, h, w = f.shape
    k = h // size
    return f.reshape(b, c, size, k, size, k).mean(axis=(3, 5))


def smaller_pair(a: np.ndarray, b: np.ndarray):
    size = min(a.shape[-1], b.shape[-1])
    return block_mean(a, size), block_mean(b, size)


def ref_nst(f_s, f_t):
    s, t = smaller_pair(np64(f_s), np64(f_t))
    total = 0.0
    for b in range(len(s)):
        rows_s = [x.ravel() / np.linalg.norm(x) for x in s[b]]
        rows_t = [x.ravel() / np.linalg.norm(x) for x in t[b]]

        def kernel(u, v):
            return np.mean([np.dot(x, y) ** 2 for x in u for y in v])

        total += kernel(rows_t, rows_t) + kernel(rows_s, rows_s) - 2 * kernel(rows_s, rows_t)
    return total / len(s)


def ref_cc(e_s, e_t):
    d = np.abs(np64(e_s) - np64(e_t))
    return np.mean([sum(d[i, k] * d[i + 1, k] for k in range(d.shape[1])) for i in range(len(d) - 1)])


def ref_fsp(stages_s, stages_t):
    def flows(stages):
        out = []
        for bottom, top in zip(stages, stages[1:]):
            bottom, top = smaller_pair(np64(bottom), np64(top))
            n = bottom.shape[-1] * bottom.shape[-2]
            g = np.zeros((len(top), top.shape[1], bottom.shape[1]))
            for b in range(len(top)):
                for j in range(top.shape[1]):
                    for i in range(bottom.shape[1]):
                        g[b, j, i] = (top[b, j] * bottom[b, i]).sum() / n
            out.append(g)
        return out

    return sum(((gs - gt) ** 2).mean() for gs, gt in zip(flows(stages_s), flows(stages_t)))


def ref_kdsvd(stages_s, stages_t, k=1):
    def top_vectors(f, n):
        f = np64(f)
        b, c = f.shape[:2]
        vs, ss = [], []
        for i in range(b):
            _, s, vt = np.linalg.svd(f[i].reshape(c, -1).T, full_matrices=False)
            v = vt[:n].T  # (C, n)
            vs.append(v / np.linalg.norm(v, axis=0))
            ss.append(s[:n] / np.linalg.norm(s[:n]))
        return np.stack(vs), np.stack(ss)

    total, prev = 0.0, None
    for f_s, f_t in zip(stages_s, stages_t):
        v_t, s_t = top_vectors(f_t, k)
        v_s_all, _ = top_vectors(f_s, k + 3)
        v_s = np.zeros_like(v_t)
        for b in range(len(v_t)):
            for j in range(k):
                col = v_t[b, :, j]
                v_t[b, :, j] = col * (1 if col[np.argmax(np.abs(col))] > 0 else -1)
                cos = v_s_all[b].T @ v_t[b, :, j]
                best = np.argmax(np.abs(cos))
                v_s[b, :, j] = np.sign(cos[best]) * v_s_all[b, :, best]
        v_t, v_s = v_t * s_t[:, None, :], v_s * s_t[:, None, :]
        if prev is not None:
            for b in range(len(v_t)):
                for c in range(v_t.shape[1]):
                    for c0 in range(prev[0].shape[1]):
                        for j in range(k):
                            rs = math.exp(-((v_s[b, c, j] - prev[0][b, c0, j]) ** 2) / 8)
                            rt = math.exp(-((v_t[b, c, j] - prev[1][b, c0, j]) ** 2) / 8)
                            total += (rs - rt) ** 2
        prev = v_s, v_t
    return total / len(stages_s[0])


def ref_hcl(features_s, features_t):
    total = 0.0
    for f_s, f_t in zip(features_s, features_t):
        s, t = np64(f_s), np64(f_t)
        num, den, weight = ((s - t) ** 2).mean(), 1.0, 1.0
        for level in (4, 2, 1):
            if level < s.shape[2]:
                weight /= 2
                num += weight * ((block_mean(s, level) - block_mean(t, level)) ** 2).mean()
                den += weight
        total += num / den
    return total


def zscore(z):
    z = np64(z)
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, ddof=1, keepdims=True) + 1e-7)


def softmax_rows(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ref_dist(z_s, z_t, beta=1.0, gamma=1.0, tau=1.0, standardize=False):
    z_s, z_t = (zscore(z_s), zscore(z_t)) if standardize else (np64(z_s), np64(z_t))
    p_s, p_t = softmax_rows(z_s / tau), softmax_rows(z_t / tau)
    inter = 1 - np.mean([np.corrcoef(p_s[i], p_t[i])[0, 1] for i in range(len(p_s))])
    intra = 1 - np.mean([np.corrcoef(p_s[:, c], p_t[:, c])[0, 1] for c in range(p_s.shape[1])])
    return tau**2 * (beta * inter + gamma * intra)


def ref_kd_ls(z_s, z_t, tau):
    p, q = softmax_rows(zscore(z_s) / tau), softmax_rows(zscore(z_t) / tau)
    return tau**2 * np.mean(
        [sum(q[b, c] * math.log(q[b, c] / p[b, c]) for c in range(q.shape[1])) for b in range(len(q))]
    )


def ref_dkd_ls(z_s, z_t, target, alpha, beta, tau):
    p, q = softmax_rows(zscore(z_s) / tau), softmax_rows(zscore(z_t) / tau)
    total = 0.0
    for b, g in enumerate(target.tolist()):
        tckd = q[b, g] * math.log(q[b, g] / p[b, g]) + (1 - q[b, g]) * math.log((1 - q[b, g]) / (1 - p[b, g]))
        others = [c for c in range(q.shape[1]) if c != g]
        qn, pn = q[b, others] / q[b, others].sum(), p[b, others] / p[b, others].sum()
        total += alpha * tckd + beta * float((qn * np.log(qn / pn)).sum())
    return tau**2 * total / len(q)


def ref_vid(mean, f_t, log_scale, eps=1e-5):
    var = np.log1p(np.exp(np64(log_scale))) + eps
    m, t = np64(mean), np64(f_t)
    return np.mean(
        [0.5 * ((m[b, c] - t[b, c]) ** 2 / var[c] + math.log(var[c])) for b in range(len(m)) for c in range(len(var))]
    )


def phi_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def ref_margin(weight, bias):
    out = []
    for s, m in zip(np64(weight), np64(bias)):
        s = abs(s)
        if phi_cdf(-m / s) > 0.001:
            out.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / phi_cdf(-m / s) + m)
        else:
            out.append(-3 * s)
    return np.array(out)


def ref_ofd(feats_s, feats_t, margins):
    """mdistiller's three-case form of the partial L2 (the library uses the official max/mask form)."""
    n, total = len(feats_s), 0.0
    for i, (s, t, m) in enumerate(zip(feats_s, feats_t, margins)):
        s, t = np64(s), block_mean(np64(t), s.shape[-1])
        m = np.asarray(m)[None, :, None, None]
        loss = (
            (s - m) ** 2 * ((s > m) & (t <= m)) + (s - t) ** 2 * ((s > t) & (t > m) & (t <= 0)) + (s - t) ** 2 * (t > 0)
        )
        total += loss.sum() / len(s) / 2 ** (n - 1 - i)
    return total


def ref_ab(stages_s, stages_t, margin=1.0):
    n, total = len(stages_s), 0.0
    for i, (s, t) in enumerate(zip(stages_s, stages_t)):
        s, t = np64(s), np64(t)
        loss = (s + margin) ** 2 * ((s > -margin) & (t <= 0)) + (s - margin) ** 2 * ((s <= margin) & (t > 0))
        total += 2.0 ** (i - n + 1) * loss.sum() / len(s)
    return total


def ref_ft(f_s, f_t):
    s, t = smaller_pair(np64(f_s), np64(f_t))

    def factor(f):
        a = (f**2).mean(axis=1).reshape(len(f), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    return np.abs(factor(s) - factor(t)).mean()


# ---- (a) golden values -------------------------------------------------------------------------
def golden_cases():
    x = inputs()
    margins = [ofd_margin(x["bn_weight"], x["bn_bias"]), ofd_margin(x["bn_weight"][:6], x["bn_bias"][:6])]
    ref_margins = [ref_margin(x["bn_weight"], x["bn_bias"]), ref_margin(x["bn_weight"][:6], x["bn_bias"][:6])]
    return {
        "nst": (lambda: nst_loss(x["f_s"], x["f_t"]), lambda: ref_nst(x["f_s"], x["f_t"])),
        "nst_pooled": (lambda: nst_loss(x["f_s"], x["f_big"]), lambda: ref_nst(x["f_s"], x["f_big"])),
        "cc": (lambda: cc_loss(x["e_s"], x["e_t"]), lambda: ref_cc(x["e_s"], x["e_t"])),
        "fsp": (lambda: fsp_loss(x["stages_s"], x["stages_t"]), lambda: ref_fsp(x["stages_s"], x["stages_t"])),
        "kdsvd": (lambda: kdsvd_loss(x["stages_s"], x["stages_t"]), lambda: ref_kdsvd(x["stages_s"], x["stages_t"])),
        "kdsvd_k2": (
            lambda: kdsvd_loss(x["stages_s"], x["stages_t"], k=2),
            lambda: ref_kdsvd(x["stages_s"], x["stages_t"], k=2),
        ),
        "hcl": (lambda: hcl_loss(x["review_s"], x["review_t"]), lambda: ref_hcl(x["review_s"], x["review_t"])),
        "dist": (lambda: dist_loss(x["z_s"], x["z_t"]), lambda: ref_dist(x["z_s"], x["z_t"])),
        "dist_t4": (
            lambda: dist_loss(x["z_s"], x["z_t"], 2.0, 0.5, 4.0),
            lambda: ref_dist(x["z_s"], x["z_t"], 2.0, 0.5, 4.0),
        ),
        "dist_ls": (
            lambda: dist_loss(x["z_s"], x["z_t"], temperature=2.0, standardize=True),
            lambda: ref_dist(x["z_s"], x["z_t"], tau=2.0, standardize=True),
        ),
        "kd_ls": (
            lambda: kd_loss(x["z_s"], x["z_t"], 2.0, standardize=True),
            lambda: ref_kd_ls(x["z_s"], x["z_t"], 2.0),
        ),
        "dkd_ls": (
            lambda: dkd_loss(x["z_s"], x["z_t"], x["target"], 1.0, 8.0, 2.0, standardize=True),
            lambda: ref_dkd_ls(x["z_s"], x["z_t"], x["target"], 1.0, 8.0, 2.0),
        ),
        "vid": (
            lambda: vid_loss(x["f_s"], x["f_t"], x["log_scale"]),
            lambda: ref_vid(x["f_s"], x["f_t"], x["log_scale"]),
        ),
        "ofd": (
            lambda: ofd_loss(x["ofd_s"], x["ofd_t"], margins),
            lambda: ref_ofd(x["ofd_s"], x["ofd_t"], ref_margins),
        ),
        "ab": (
            lambda: ab_loss([x["stages_s"][0], x["f_s"]], [x["stages_t"][0], x["f_t"]]),
            lambda: ref_ab([x["stages_s"][0], x["f_s"]], [x["stages_t"][0], x["f_t"]]),
        ),
        "ft": (lambda: ft_loss(x["f_s"], x["f_big"]), lambda: ref_ft(x["f_s"], x["f_big"])),
    }


GOLDEN = {
    "ab": 516.0862,
    "cc": 18.02686,
    "dist": 2.034383,
    "dist_ls": 7.878946,
    "dist_t4": 41.66801,
    "dkd_ls": 6.741196,
    "fsp": 0.09912025,
    "ft": 0.1390465,
    "hcl": 4.588988,
    "kd_ls": 0.8909252,
    "kdsvd": 0.1601467,
    "kdsvd_k2": 0.08981332,
    "nst": 0.2430955,
    "nst_pooled": 0.2944472,
    "ofd": 106.7296,
    "vid": 1.528614,
}


@pytest.mark.parametrize("case", sorted(golden_cases()))
def test_golden_value_matches_pinned_and_rederivation(case):
    fn, ref = golden_cases()[case]
    value = fn()
    assert value.dtype == torch.float32 and value.dim() == 0
    assert value.item() == pytest.approx(ref(), rel=5e-5, abs=1e-7)  # the formula
    assert value.item() == pytest.approx(GOLDEN[case], rel=1e-5)  # the pinned number


def test_ofd_margin_matches_the_truncated_normal_mean_and_its_floor():
    x = inputs()
    weight = torch.cat([x["bn_weight"], torch.tensor([0.5, -2.0])])
    bias = torch.cat([x["bn_bias"], torch.tensor([2.0, 0.3])])  # Φ(−4) < 0.001: the floor −3|γ|
    margin = ofd_margin(weight, bias)
    np.testing.assert_allclose(margin.numpy(), ref_margin(weight, bias), rtol=1e-5)
    assert margin[-2].item() == pytest.approx(-1.5) and (margin < 0).all()


# ---- (b) properties ----------------------------------------------------------------------------
def pair_losses():
    """(loss of (student, teacher), student, teacher) for the functions that vanish when they agree."""
    x = inputs()
    return {
        "nst": (nst_loss, x["f_s"], x["f_big"]),
        "cc": (cc_loss, x["e_s"], x["e_t"]),
        "fsp": (lambda s, t: fsp_loss([x["stages_s"][0], s], [x["stages_s"][0], t]), x["f_s"], x["f_t"]),
        "kdsvd": (lambda s, t: kdsvd_loss([x["stages_s"][0], s], [x["stages_s"][0], t]), x["f_s"], x["f_t"]),
        "hcl": (lambda s, t: hcl_loss([s], [t]), x["f_s"], x["f_t"]),
        "dist": (dist_loss, x["z_s"], x["z_t"]),
        "ofd": (lambda s, t: ofd_loss([s], [t], [torch.full((8,), -0.5)]), x["f_s"], x["f_t"]),
        "ft": (ft_loss, x["f_s"], x["f_big"]),
    }


@pytest.mark.parametrize("name", sorted(pair_losses()))
def test_zero_when_student_equals_teacher(name):
    fn, s, _ = pair_losses()[name]
    assert fn(s, s.clone()).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("name", sorted(set(pair_losses()) - {"cc"}))
def test_gradient_reaches_only_the_student(name):
    fn, s, t = pair_losses()[name]
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    fn(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and torch.isfinite(s.grad).all()
    assert t.grad is None


def test_cc_trains_both_embeddings():
    x = inputs()
    e_s, e_t = x["e_s"].requires_grad_(), x["e_t"].requires_grad_()
    cc_loss(e_s, e_t).backward()
    assert e_s.grad.abs().sum() > 0 and e_t.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["nst", "dist", "hcl", "kdsvd"])
def test_float32_under_bf16_autocast(name):
    fn, s, t = pair_losses()[name]
    s, t = s.bfloat16(), t.bfloat16()
    expected = fn(s.float(), t.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = fn(s, t)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


def test_standardised_losses_ignore_each_samples_logit_scale_and_shift():
    x = inputs()
    z_s, z_t, y = x["z_s"], x["z_t"], x["target"]
    scale, shift = torch.tensor([[0.5], [2.0], [3.0], [10.0]]), torch.tensor([[1.0], [-4.0], [0.0], [7.0]])
    for fn in (
        lambda s, t: kd_loss(s, t, 2.0, standardize=True),
        lambda s, t: dkd_loss(s, t, y, temperature=2.0, standardize=True),
        lambda s, t: dist_loss(s, t, standardize=True),
    ):
        assert fn(scale * z_s + shift, z_t / scale - shift).item() == pytest.approx(fn(z_s, z_t).item(), rel=1e-4)
    assert kd_loss(z_s, z_t, 2.0).item() != pytest.approx(kd_loss(z_s, z_t, 2.0, standardize=True).item())


def test_dist_is_linear_in_beta_and_gamma():
    x = inputs()
    inter, intra = dist_loss(x["z_s"], x["z_t"], 1.0, 0.0), dist_loss(x["z_s"], x["z_t"], 0.0, 1.0)
    assert dist_loss(x["z_s"], x["z_t"], 2.0, 3.0).item() == pytest.approx((2 * inter + 3 * intra).item(), rel=1e-5)


def test_vid_regressor_starts_at_the_initial_variance_and_pools_the_larger_map():
    regressor = VIDRegressor(6, 8, init_pred_var=5.0, eps=1e-5)
    assert (F.softplus(regressor.log_scale) + 1e-5).detach() == pytest.approx(torch.full((8,), 5.0), rel=1e-5)
    x = inputs()
    expected = vid_loss(regressor.mean(F.adaptive_avg_pool2d(x["f_big"], 4)), x["f_t"], regressor.log_scale)
    assert regressor(x["f_big"], x["f_t"]).item() == pytest.approx(expected.item())


def test_fsp_and_kdsvd_refuse_different_channel_counts():
    x = inputs()
    with pytest.raises(ValueError, match="equal channel counts"):
        fsp_loss(x["stages_s"], x["stages_t"][:2] + [x["f_big"]])
    with pytest.raises(ValueError, match="equal channel counts"):
        kdsvd_loss([x["f_s"], x["f_t"]], [x["f_s"], x["f_big"]])


def test_ab_loss_is_zero_beyond_the_margin_on_the_teachers_side():
    t = torch.tensor([-1.0, 2.0, -0.5, 0.3]).view(1, 4, 1, 1)
    s = torch.tensor([-1.5, 1.2, 0.0, 0.5]).view(1, 4, 1, 1)  # off/beyond, on/beyond, off/inside, on/inside
    assert ab_loss([s], [t]).item() == pytest.approx(1.0**2 + 0.5**2)
    with pytest.raises(ValueError, match="equal shapes"):
        ab_loss([s], [t.expand(1, 4, 2, 2)])


def test_ft_modules_reach_the_factor_shape():
    paraphraser, translator = Paraphraser(16), Translator(8, 16)
    factor, reconstruction = paraphraser(torch.randn(2, 16, 4, 4))
    assert factor.shape == (2, 8, 4, 4) and reconstruction.shape == (2, 16, 4, 4)
    assert translator(torch.randn(2, 8, 4, 4)).shape == (2, 8, 4, 4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in paraphraser.modules())


def test_abf_fuses_the_deeper_residual_and_reaches_the_teacher_size():
    abf = ABF(8, 6, 10, fuse=True)
    out, residual = abf(torch.randn(2, 8, 4, 4), torch.randn(2, 6, 2, 2), (8, 8))
    assert out.shape == (2, 10, 8, 8) and residual.shape == (2, 6, 8, 8)
    assert ABF(8, 6, 10, fuse=False).att_conv is None


# ---- (c) terms ---------------------------------------------------------------------------------
def fake_output(channels, sizes, num_classes=10, batch=4, seed=0) -> StagedOutput:
    """A StagedOutput (with pre-activations and their BatchNorm parameters) of leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).requires_grad_()  # noqa: E731
    stages = tuple(r(batch, c, s, s) for c, s in zip(channels, sizes))
    return StagedOutput(
        logits=r(batch, num_classes),
        stages=stages,
        feature=r(batch, channels[-1], sizes[-1], sizes[-1]),
        embedding=r(batch, channels[-1]),
        preacts=tuple(r(*f.shape) for f in stages),
        preact_bn=tuple((r(c), r(c)) for c in channels),
    )


def student_teacher(same_width: bool = False):
    student = fake_output((4, 8, 16), (8, 4, 2), seed=0)
    teacher = fake_output((4, 8, 16) if same_width else (3, 6, 12, 24), (16, 8, 4, 2), seed=1)
    return student, teacher


NEW_TERMS = [CCTerm, VIDTerm, NSTTerm, KDSVDTerm, OFDTerm, ReviewKDTerm, DISTTerm]
TARGETS, INDEX = torch.tensor([0, 1, 2, 3]), torch.arange(4)


def built(cls, **kwargs):
    term = cls(**kwargs)
    term.build(*student_teacher(same_width=cls is KDSVDTerm))
    return term


def only_read_fields(out: StagedOutput, fields) -> StagedOutput:
    """``out`` with every field a term does not declare in ``reads_teacher`` set to None."""
    return StagedOutput(**{k: (v if k in fields else None) for k, v in out._asdict().items()})


@pytest.mark.parametrize(
    "cls,kwargs",
    [(c, {}) for c in NEW_TERMS] + [(KDTerm, {"standardize": True}), (DKDTerm, {"standardize": True})],
    ids=lambda x: getattr(x, "name", str(x)),
)
def test_term_gradients_reach_the_student_and_every_connector_never_the_teacher(cls, kwargs):
    term = built(cls, **kwargs)
    s, t = student_teacher(same_width=cls is KDSVDTerm)
    loss = term(s, only_read_fields(t, cls.reads_teacher), TARGETS, INDEX)  # reads_teacher is complete
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    student_grads = [x.grad for x in (s.logits, *s.stages, s.feature, s.embedding, *s.preacts) if x.grad is not None]
    assert student_grads and all(g.abs().sum() > 0 for g in student_grads)
    teacher = (t.logits, *t.stages, t.feature, t.embedding, *t.preacts, *(p for bn in t.preact_bn for p in bn))
    assert all(x.grad is None for x in teacher)
    for name, p in term.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_term_names_default_weights_and_teacher_fields():
    assert {cls.name: cls().weight for cls in NEW_TERMS} == {
        "cc": 0.02,
        "vid": 1.0,
        "nst": 50.0,
        "kdsvd": 1.0,
        "ofd": 1e-3,
        "reviewkd": 1.0,
        "dist": 2.0,
    }
    assert DISTTerm().temperature == 4.0 and KDSVDTerm().k == 1
    assert OFDTerm.reads_teacher == {"preacts", "preact_bn"} and DISTTerm.reads_teacher == {"logits"}


@pytest.mark.parametrize(
    "make",
    [
        lambda: KDTerm(temperature=0),
        lambda: DKDTerm(beta=-1),
        lambda: DISTTerm(temperature=-4),
        lambda: NSTTerm(weight=-50),
        lambda: VIDTerm(init_pred_var=0.0),
        lambda: KDSVDTerm(k=0),
        lambda: ReviewKDTerm(warmup=-1),
        lambda: OFDTerm(weight=float("nan")),
    ],
)
def test_terms_refuse_bad_numbers_in_one_line(make):
    with pytest.raises(ValueError) as err:
        make()
    assert "Term " in str(err.value) and "\n" not in str(err.value)


def test_vid_and_review_pair_the_deepest_stages():
    term = built(VIDTerm)
    assert [r.mean[0].out_channels for r in term.regressors] == [6, 12, 24]  # teacher stages 1..3
    review = built(ReviewKDTerm)
    # deepest first: the embedding (16 → 24), then the stages 16 → 24, 8 → 12, 4 → 6; middle width 16
    assert [(a.conv1[0].in_channels, a.conv2[0].out_channels) for a in review.abfs] == [
        (16, 24),
        (16, 24),
        (8, 12),
        (4, 6),
    ]
    assert {a.conv1[0].out_channels for a in review.abfs} == {16}
    assert [a.att_conv is None for a in review.abfs] == [True, False, False, False]


def test_reviewkd_weight_warms_up_over_20_epochs():
    term = ReviewKDTerm(weight=5.0)
    assert [term.weight_at(e) for e in (0, 9, 19, 100)] == pytest.approx([0.25, 2.5, 5.0, 5.0])
    assert ReviewKDTerm(warmup=0).weight_at(0) == 1.0


def test_ofd_loss_of_the_term_uses_the_teachers_margins():
    term = built(OFDTerm)
    s, t = student_teacher()
    feats = [c(f) for c, f in zip(term.connectors, s.preacts)]
    margins = [ofd_margin(*bn) for bn in t.preact_bn[1:]]
    expected = ofd_loss(feats, t.preacts[1:], margins)
    assert term(s, t, TARGETS, INDEX).item() == pytest.approx(expected.item())


def test_terms_refuse_networks_without_preacts_and_kdsvd_unequal_widths():
    s, t = student_teacher()
    plain = StagedOutput(*t[:4])
    with pytest.raises(ValueError, match=r"which the teacher does not return: call keep_preacts\(\)"):
        OFDTerm().build(s, plain)
    with pytest.raises(ValueError, match=r"which the student does not return: call keep_preacts\(\)"):
        OFDTerm().build(StagedOutput(*s[:4]), t)
    with pytest.raises(ValueError, match=r"pre-activations, which it does not return: call keep_preacts\(\)"):
        ReviewKDTerm().build(s, plain)
    no_norm = t._replace(preact_bn=(None,) * 4)
    with pytest.raises(ValueError, match="BatchNorm before the teacher's pre-activation"):
        OFDTerm().build(s, no_norm)
    with pytest.raises(ValueError, match="equal channel counts"):
        KDSVDTerm().build(s, t)


# ---- (d) pre-activation outputs of the zoo -----------------------------------------------------
ZOO = ["resnet8", "bottleneck", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "resnet18", "mobilenet_v2"]


def zoo_model(name: str, preacts: bool) -> StagedNet:
    """A zoo model with 10 classes; "bottleneck" is the CIFAR ResNet-50's architecture, one block a stage."""
    model = (
        create_model(name, num_classes=10) if name != "bottleneck" else BottleneckResNet((1, 1, 1, 1), num_classes=10)
    )
    if preacts:
        model.keep_preacts()
    return model


@pytest.mark.parametrize("name", ZOO)
def test_preacts_leave_every_other_output_unchanged_and_are_what_the_stage_activates(name):
    torch.manual_seed(0)
    plain, kept = zoo_model(name, preacts=False).eval(), zoo_model(name, preacts=True).eval()
    kept.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = plain(x, features=True), kept(x, features=True)
        assert a.preacts is None and torch.equal(kept(x), a.logits)
    for u, v in zip(a[:4], b[:4]):
        assert all(torch.equal(p, q) for p, q in zip(u, v)) if isinstance(u, tuple) else torch.equal(u, v)
    assert [p.shape for p in b.preacts] == [f.shape for f in b.stages]
    norms = kept.preact_norms()
    for stage, pre, norm in zip(b.stages, b.preacts, norms):
        if name.startswith("wrn"):  # the next BatchNorm that feeds a ReLU
            assert torch.equal(pre, norm(stage))
        elif "obile" in name:  # linear bottlenecks: nothing to undo
            assert pre is stage
        else:
            assert torch.equal(F.relu(pre), stage) and (pre < 0).any()
    for norm, bn, pre in zip(norms, b.preact_bn, b.preacts):
        assert (norm is None) == (bn is None) == (name == "ShuffleV2")
        assert bn is None or (bn[0] is norm.weight and bn[0].shape == (pre.shape[1],))


def test_wrn_preacts_update_the_batchnorm_statistics_once():
    torch.manual_seed(0)
    plain = create_model("wrn_16_2", num_classes=10).train()
    kept = create_model("wrn_16_2", num_classes=10).train()
    kept.keep_preacts()
    kept.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    plain(x, features=True), kept(x, features=True)
    for (key, u), v in zip(plain.state_dict().items(), kept.state_dict().values()):
        assert torch.equal(u, v), key


def test_a_network_without_preacts_is_refused_in_one_line():
    class Opaque(StagedNet):
        pass

    with pytest.raises(ValueError, match="Opaque does not define pre-activation stage outputs"):
        Opaque().keep_preacts()
    assert Opaque().unavailable_outputs()["preacts"] == "Opaque defines no pre-activation stage outputs"


def test_the_engine_asks_for_preacts_only_where_a_term_reads_them():
    kd = OfflineKD(student="resnet8", teacher="resnet20", terms=[CCTerm()], num_classes=10, in_chans=1, image_size=16)
    assert not kd.student.preacts_kept and not kd.teacher.preacts_kept
    review = OfflineKD(
        student="resnet8", teacher="resnet20", terms=[ReviewKDTerm()], num_classes=10, in_chans=1, image_size=16
    )
    assert review.teacher.preacts_kept and not review.student.preacts_kept  # ReviewKD reads the student's stages
    with pytest.raises(ValueError, match="OFDTerm reads the student's preacts, which timm/test_vit cannot give"):
        OfflineKD(
            student="timm/test_vit", teacher="resnet20", terms=[OFDTerm()], num_classes=10, in_chans=1, image_size=16
        )


def test_ofd_refuses_a_teacher_without_a_batchnorm_before_its_preacts():
    with pytest.raises(ValueError, match="BatchNorm before the teacher's pre-activation"):
        OfflineKD(
            student="resnet8",
            teacher="ShuffleV2",
            terms=[OFDTerm()],
            num_classes=10,
            in_chans=1,
            image_size=16,
        )


def test_engine_gradients_reach_the_student_and_connectors_only(digits_teacher):  # noqa: F811
    module = OfflineKD(
        student="resnet8",
        teacher="resnet20",
        teacher_weights=str(digits_teacher),
        terms=[CCTerm(), VIDTerm(), OFDTerm(), ReviewKDTerm(warmup=0)],
        num_classes=10,
        in_chans=1,
        image_size=16,
    )
    module.train()
    losses, _ = module.training_losses(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)), torch.arange(8))
    sum(losses.values()).backward()
    assert set(losses) == {"ce", "cc", "vid", "ofd", "reviewkd"}
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())


# ---- (e) configs -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", NEW_METHODS)
def test_method_config_parses_and_trains_one_step_on_the_digits(in_tmp, method):
    cli = build_cli(
        ["--config", str(CONFIGS / "digits/pair.yaml"), "--config", str(CONFIGS / f"methods/{method}.yaml")]
        + ["--model.init_args.teacher_weights=null"],
        run=False,
    )
    module = cli.model.train()
    assert [term.name for term in module.terms] == [method.removesuffix("_ls")]
    torch.manual_seed(0)
    losses, _ = module.training_losses(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)), torch.arange(8))
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and all(p.grad is not None for p in module.terms.parameters())


def test_standardised_configs_use_the_official_recipe():
    expected = {"kd_ls": (0.1, 9.0, 2.0), "dkd_ls": (1.0, 9.0, 2.0), "dist_ls": (1.0, 2.0, 2.0)}
    for method, (ce, weight, tau) in expected.items():
        cli = build_cli(
            ["--config", str(CONFIGS / "digits/pair.yaml"), "--config", str(CONFIGS / f"methods/{method}.yaml")]
            + ["--model.init_args.teacher_weights=null"],
            run=False,
        )
        (term,) = cli.model.terms
        assert (cli.model.ce_weight, term.weight, term.temperature, term.standardize) == (ce, weight, tau, True)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vid", "kdsvd", "ofd", "reviewkd"])  # connectors, SVD, pre-activations
def test_method_config_fits_through_the_cli(in_tmp, digits_teacher, method):  # noqa: F811
    fit_digits(method, digits_teacher)
    rows = read_metrics(in_tmp / "runs/digits/offlinekd/resnet20-resnet8/version_0")
    name = method.removesuffix("_ls")
    logged = [r[f"train/loss_{name}_step"] for r in rows if f"train/loss_{name}_step" in r]
    assert logged and all(math.isfinite(v) for v in logged)
    assert any("val/top1" in r for r in rows)


@pytest.mark.ddp
def test_two_process_ddp_keeps_vid_ofd_and_reviewkd_state_identical(tmp_path, digits_teacher):  # noqa: F811
    terms = '[{"class_path": "distill.losses.VIDTerm"}, {"class_path": "distill.losses.OFDTerm"}, '
    terms += '{"class_path": "distill.losses.ReviewKDTerm", "init_args": {"warmup": 0}}]'
    args = ["fit", "--config", str(CONFIGS / "digits/pair.yaml"), "--config", str(CONFIGS / "methods/ofd.yaml")]
    args += [f"--model.init_args.terms={terms}", f"--model.init_args.teacher_weights={digits_teacher}"]
    args += ["--trainer.max_epochs=1", *FAST, "--trainer.limit_train_batches=3"]
    rank0, rank1 = run_two_ranks(args, tmp_path)
    assert any(".log_scale" in k for k in rank0) and any("abfs.0.conv1.1.running_mean" in k for k in rank0)
    assert_same_tensors(rank0, rank1)


def test_reproduction_covers_the_new_rows(tmp_path):
    script = CONFIGS.parent / "scripts/reproduce_cifar100.py"
    result = subprocess.run(
        [sys.executable, str(script), "--dry-run", "--methods", "all", "--seeds", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()
    runs = {m: [c for c in commands if f"/methods/{m}.yaml " in c] for m in NEW_METHODS}
    assert {m: len(c) for m, c in runs.items()} == {m: 5 if m == "kdsvd" else 10 for m in NEW_METHODS}
    assert len(commands) == 6 + 9 + 10 * 18 + 5  # teachers, students, 19 methods on every pair but KDSVD
    weights = {
        c.split("/pairs/")[1].split(".yaml")[0]: c.split("weight=")[1] for c in runs["reviewkd"] if "weight=" in c
    }
    assert weights["resnet32x4_resnet8x4"] == "5.0" and "vgg13_vgg8" not in weights
