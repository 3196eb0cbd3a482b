"""The classic losses (docs/methods/offline.md#the-losses): golden values, properties, and the engine's terms.

Golden values are pinned for a fixed seeded input and each is re-derived here independently
(float64 numpy with explicit loops), so a pinned number is known to be the paper's formula.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    ATTerm,
    ConvRegressor,
    CRDTerm,
    DKDTerm,
    FitNetTerm,
    KDTerm,
    PKTTerm,
    RKDTerm,
    SPTerm,
    at_loss,
    at_loss_stages,
    contrast_logits,
    crd_loss,
    dkd_loss,
    fitnet_loss,
    kd_loss,
    pkt_loss,
    rkd_loss,
    sp_loss,
)
from distill.losses.crd import all_gather_cat
from distill.models.staged import StagedOutput


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(
        z_s=r(4, 10),
        z_t=r(4, 10),
        target=torch.tensor([3, 0, 7, 9]),
        f_s=r(4, 8, 4, 4),
        f_t=r(4, 8, 4, 4),
        f_big=r(4, 6, 8, 8),
        e_s=r(4, 16),
        e_t=r(4, 12),
    )


def crd_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        e_s=F.normalize(torch.randn(4, 6, generator=g), dim=1),
        e_t=F.normalize(torch.randn(4, 6, generator=g), dim=1),
        memory_s=F.normalize(torch.randn(20, 6, generator=g), dim=1),
        memory_t=F.normalize(torch.randn(20, 6, generator=g), dim=1),
        idx=torch.randint(0, 20, (4, 6), generator=g),
        z_s=3.0,
        z_t=5.0,
        temperature=0.5,
    )


# ---- independent re-derivations (float64 numpy, explicit loops) -------------------------------
def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def ref_kd(z_s, z_t, tau):
    z_s, z_t = np64(z_s), np64(z_t)
    total = 0.0
    for b in range(len(z_s)):
        p, q = softmax(z_s[b] / tau), softmax(z_t[b] / tau)
        total += sum(q[c] * math.log(q[c] / p[c]) for c in range(len(p)))
    return tau**2 * total / len(z_s)


def ref_dkd(z_s, z_t, target, alpha, beta, tau):
    z_s, z_t = np64(z_s), np64(z_t)
    tckd = nckd = 0.0
    for b, g in enumerate(target.tolist()):
        p, q = softmax(z_s[b] / tau), softmax(z_t[b] / tau)
        for qb, pb in ((q[g], p[g]), (1 - q[g], 1 - p[g])):
            tckd += qb * math.log(qb / pb)
        for c in range(len(p)):
            if c != g:
                qc, pc = q[c] / (1 - q[g]), p[c] / (1 - p[g])
                nckd += qc * math.log(qc / pc)
    return tau**2 * (alpha * tckd + beta * nckd) / len(z_s)


def ref_fitnet(f_s, f_t):
    return float(((np64(f_s) - np64(f_t)) ** 2).mean())


def ref_at(f_s, f_t, p=2):
    f_s, f_t = np64(f_s), np64(f_t)
    if f_t.shape[-1] > f_s.shape[-1]:  # integer-factor block average = adaptive average pooling
        k = f_t.shape[-1] // f_s.shape[-1]
        b, c, h, w = f_t.shape
        f_t = f_t.reshape(b, c, h // k, k, w // k, k).mean(axis=(3, 5))
    total, count = 0.0, 0
    for b in range(len(f_s)):
        a_s = (f_s[b] ** p).mean(axis=0).ravel()
        a_t = (f_t[b] ** p).mean(axis=0).ravel()
        a_s, a_t = a_s / np.sqrt((a_s**2).sum()), a_t / np.sqrt((a_t**2).sum())
        for i in range(len(a_s)):
            total += (a_s[i] - a_t[i]) ** 2
            count += 1
    return total / count


def ref_sp(f_s, f_t):
    def gram(f):
        f = np64(f).reshape(len(f), -1)
        g = np.array([[np.dot(f[i], f[j]) for j in range(len(f))] for i in range(len(f))])
        return g / np.sqrt((g**2).sum(axis=1, keepdims=True))

    return float(((gram(f_t) - gram(f_s)) ** 2).sum() / len(f_s) ** 2)


def smooth_l1(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def ref_rkd(e_s, e_t, w_d=25.0, w_a=50.0):
    e_s, e_t = np64(e_s), np64(e_t)
    n = len(e_s)

    def distances(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
        return d / (d.sum() / (n * n - n))

    def angles(e):
        out = []
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u, v = e[j] - e[i], e[k] - e[i]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    out.append(0.0 if nu == 0 or nv == 0 else np.dot(u, v) / (nu * nv))
        return np.array(out)

    loss_d = np.mean([smooth_l1(x) for x in (distances(e_s) - distances(e_t)).ravel()])
    loss_a = np.mean([smooth_l1(x) for x in angles(e_s) - angles(e_t)])
    return w_d * loss_d + w_a * loss_a


def ref_pkt(e_s, e_t):
    def conditional(e):
        e = np64(e)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        s = (e @ e.T + 1) / 2
        return s / s.sum(axis=1, keepdims=True)

    p_s, p_t = conditional(e_s), conditional(e_t)
    return float(
        np.mean([p_t[i, j] * math.log(p_t[i, j] / p_s[i, j]) for i in range(len(p_s)) for j in range(len(p_s))])
    )


def ref_crd(e_s, e_t, memory_s, memory_t, idx, z_s, z_t, temperature):
    e_s, e_t, memory_s, memory_t = map(np64, (e_s, e_t, memory_s, memory_t))
    n, (b, k1) = len(memory_s), idx.shape
    noise = (k1 - 1) / n
    total = 0.0
    for anchor, memory, z in ((e_s, memory_t, z_s), (e_t, memory_s, z_t)):
        for i in range(b):
            for j in range(k1):
                prob = math.exp(np.dot(memory[idx[i, j]], anchor[i]) / temperature) / z
                total -= math.log(prob / (prob + noise)) if j == 0 else math.log(noise / (prob + noise))
    return total / b


# ---- (a) golden values -------------------------------------------------------------------------
def golden_cases():
    x, c = inputs(), crd_inputs()
    return {
        "kd": (lambda: kd_loss(x["z_s"], x["z_t"]), lambda: ref_kd(x["z_s"], x["z_t"], 4.0)),
        "kd_tau1": (lambda: kd_loss(x["z_s"], x["z_t"], 1.0), lambda: ref_kd(x["z_s"], x["z_t"], 1.0)),
        "dkd": (
            lambda: dkd_loss(x["z_s"], x["z_t"], x["target"]),
            lambda: ref_dkd(x["z_s"], x["z_t"], x["target"], 1.0, 8.0, 4.0),
        ),
        "fitnet": (lambda: fitnet_loss(x["f_s"], x["f_t"]), lambda: ref_fitnet(x["f_s"], x["f_t"])),
        "at": (lambda: at_loss(x["f_s"], x["f_t"]), lambda: ref_at(x["f_s"], x["f_t"])),
        "at_pooled": (lambda: at_loss(x["f_s"], x["f_big"]), lambda: ref_at(x["f_s"], x["f_big"])),
        "sp": (lambda: sp_loss(x["f_s"], x["f_big"]), lambda: ref_sp(x["f_s"], x["f_big"])),
        "rkd": (lambda: rkd_loss(x["e_s"], x["e_t"]), lambda: ref_rkd(x["e_s"], x["e_t"])),
        "pkt": (lambda: pkt_loss(x["e_s"], x["e_t"]), lambda: ref_pkt(x["e_s"], x["e_t"])),
        "crd": (lambda: crd_loss(**c), lambda: ref_crd(**c)),
    }


GOLDEN = {
    "kd": 0.921169,
    "kd_tau1": 0.776042,
    "dkd": 7.22676,
    "fitnet": 2.21547,
    "at": 0.0235361,
    "at_pooled": 0.0304409,
    "sp": 0.00972264,
    "rkd": 0.682461,
    "pkt": 0.00914305,
    "crd": 9.82539,
}


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_golden_value_matches_pinned_and_rederivation(case):
    fn, ref = golden_cases()[case]
    value = fn()
    assert value.dtype == torch.float32 and value.dim() == 0
    assert value.item() == pytest.approx(ref(), rel=2e-5, abs=1e-8)  # the formula
    assert value.item() == pytest.approx(GOLDEN[case], rel=1e-5)  # the pinned number


# ---- (b) properties ----------------------------------------------------------------------------
def pair_losses():
    """(loss of (student, teacher), student, teacher) for every function; the pairs may be equal."""
    x = inputs()
    return {
        "kd": (kd_loss, x["z_s"], x["z_t"]),
        "dkd": (lambda s, t: dkd_loss(s, t, x["target"]), x["z_s"], x["z_t"]),
        "fitnet": (fitnet_loss, x["f_s"], x["f_t"]),
        "at": (at_loss, x["f_s"], x["f_big"]),
        "sp": (sp_loss, x["f_s"], x["f_big"]),
        "rkd": (rkd_loss, x["e_s"], x["e_t"]),
        "pkt": (pkt_loss, x["e_s"], x["e_t"]),
    }


@pytest.mark.parametrize("name", sorted(pair_losses()))
def test_zero_when_student_equals_teacher(name):
    fn, s, _ = pair_losses()[name]
    assert fn(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", sorted(pair_losses()))
def test_gradient_reaches_only_the_student(name):
    fn, s, t = pair_losses()[name]
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    fn(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and torch.isfinite(s.grad).all()
    assert t.grad is None


def test_crd_loss_gradient_reaches_only_the_embeddings():
    c = crd_inputs()
    for key in ("e_s", "e_t", "memory_s", "memory_t"):
        c[key] = c[key].clone().requires_grad_()
    crd_loss(**c).backward()
    assert c["e_s"].grad.abs().sum() > 0 and c["e_t"].grad.abs().sum() > 0
    assert c["memory_s"].grad is None and c["memory_t"].grad is None


@pytest.mark.parametrize("name", sorted(pair_losses()))
def test_float32_under_bf16_autocast(name):
    fn, s, t = pair_losses()[name]
    s, t = s.bfloat16(), t.bfloat16()
    expected = fn(s.float(), t.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = fn(s, t)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)


def test_kd_temperature_squared_scaling():
    x = inputs()
    for tau in (2.0, 4.0):
        # softmax(τ·z / τ) = softmax(z): the only difference is the τ² factor
        assert kd_loss(tau * x["z_s"], tau * x["z_t"], tau).item() == pytest.approx(
            tau**2 * kd_loss(x["z_s"], x["z_t"], 1.0).item(), rel=1e-5
        )


def test_dkd_is_linear_in_alpha_beta_and_decomposes_kd():
    x = inputs()
    z_s, z_t, y = x["z_s"], x["z_t"], x["target"]
    tckd = dkd_loss(z_s, z_t, y, alpha=1.0, beta=0.0)
    nckd = dkd_loss(z_s, z_t, y, alpha=0.0, beta=1.0)
    assert dkd_loss(z_s, z_t, y, 2.0, 8.0).item() == pytest.approx((2 * tckd + 8 * nckd).item(), rel=1e-5)
    # Zhao et al., 2022, Eq. 1: per sample, KD = TCKD + (1 − p_target^teacher) · NCKD
    for b in range(len(y)):
        s, t, g = z_s[b : b + 1], z_t[b : b + 1], y[b : b + 1]
        rest = 1 - F.softmax(t / 4.0, dim=1)[0, g].item()
        decomposed = dkd_loss(s, t, g, 1.0, 0.0) + rest * dkd_loss(s, t, g, 0.0, 1.0)
        assert kd_loss(s, t).item() == pytest.approx(decomposed.item(), rel=1e-5)


def test_at_stages_sums_pairs():
    x = inputs()
    total = at_loss_stages([x["f_s"], x["f_s"]], [x["f_t"], x["f_big"]])
    assert total.item() == pytest.approx(GOLDEN["at"] + GOLDEN["at_pooled"], rel=1e-5)


def test_contrast_logits_both_paths_agree():
    g = torch.Generator().manual_seed(2)
    anchor, memory = torch.randn(3, 5, generator=g), torch.randn(7, 5, generator=g)
    for k in (1, 4):  # 3·2 ≤ 7 rows gathered; 3·5 > 7 rows via one matmul
        idx = torch.randint(0, 7, (3, k + 1), generator=g)
        expected = torch.stack([torch.stack([memory[idx[b, j]] @ anchor[b] for j in range(k + 1)]) for b in range(3)])
        torch.testing.assert_close(contrast_logits(anchor, memory, idx), expected)


@pytest.mark.parametrize("s_hw,t_hw", [(8, 4), (4, 8), (6, 4), (4, 4), (3, 8)])
def test_fitnet_regressor_reaches_the_teacher_shape(s_hw, t_hw):
    reg = ConvRegressor((5, s_hw, s_hw), (7, t_hw, t_hw))
    assert reg(torch.randn(2, 5, s_hw, s_hw)).shape == (2, 7, t_hw, t_hw)


# ---- (c) terms ---------------------------------------------------------------------------------
def fake_output(channels, sizes, num_classes=10, batch=4, seed=0) -> StagedOutput:
    """A StagedOutput whose tensors are all leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    stages = tuple(torch.randn(batch, c, s, s, generator=g).requires_grad_() for c, s in zip(channels, sizes))
    feature = torch.randn(batch, channels[-1], sizes[-1], sizes[-1], generator=g).requires_grad_()
    embedding = torch.randn(batch, channels[-1], generator=g).requires_grad_()
    logits = torch.randn(batch, num_classes, generator=g).requires_grad_()
    return StagedOutput(logits, stages, feature, embedding)


def student_teacher():
    return fake_output((4, 8, 16), (8, 4, 2), seed=0), fake_output((6, 12, 24), (8, 4, 2), seed=1)


TARGETS = torch.arange(40) % 4  # 40 training samples, 4 classes
INDEX = torch.tensor([0, 5, 10, 39])


def make_term(cls, **kwargs):
    """A built term; CRD draws 8 negatives (4·9 ≤ 40 rows: gathered rows) unless told otherwise."""
    if cls is CRDTerm:
        kwargs.setdefault("num_negatives", 8)
    term = cls(**kwargs)
    term.build(*student_teacher())
    term.setup_data(TARGETS)
    return term


ALL_TERMS = [KDTerm, FitNetTerm, ATTerm, SPTerm, RKDTerm, PKTTerm, CRDTerm, DKDTerm]


@pytest.mark.parametrize(
    "cls,kwargs",
    [(c, {}) for c in ALL_TERMS] + [(CRDTerm, {"num_negatives": 16})],
    ids=lambda x: getattr(x, "name", str(x)),
)
def test_term_returns_finite_scalar_with_student_and_connector_gradients(cls, kwargs):
    term = make_term(cls, **kwargs)
    s, t = student_teacher()
    loss = term(s, t, TARGETS[INDEX], INDEX)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    student_grads = [x.grad for x in (s.logits, *s.stages, s.feature, s.embedding) if x.grad is not None]
    assert student_grads and all(g.abs().sum() > 0 for g in student_grads)
    assert all(x.grad is None for x in (t.logits, *t.stages, t.feature, t.embedding))
    for p in term.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_term_names_and_default_weights():
    expected = {
        "kd": 0.9,
        "fitnet": 100.0,
        "at": 1000.0,
        "sp": 3000.0,
        "rkd": 1.0,
        "pkt": 30000.0,
        "crd": 0.8,
        "dkd": 1.0,
    }
    assert {cls.name: cls().weight for cls in ALL_TERMS} == expected


def test_fitnet_uses_the_middle_stages_by_default():
    term = make_term(FitNetTerm)
    assert term.regressor.conv.in_channels == 8 and term.regressor.conv.out_channels == 12
    term = make_term(FitNetTerm, student_stage=0, teacher_stage=2)
    assert term.regressor.conv.in_channels == 4 and term.regressor.conv.out_channels == 24


def test_at_pairs_the_last_stages_when_counts_differ():
    s, _ = student_teacher()
    t = fake_output((3, 6, 12, 24), (16, 8, 4, 2), seed=1)
    expected = at_loss_stages(s.stages, t.stages[1:])
    assert ATTerm()(s, t, None, None).item() == pytest.approx(expected.item())


def test_dkd_weight_warms_up_over_20_epochs():
    term = DKDTerm(weight=2.0)
    assert [term.weight_at(e) for e in (0, 9, 18, 19, 100)] == pytest.approx([0.1, 1.0, 1.9, 2.0, 2.0])
    assert DKDTerm(warmup=0).weight_at(0) == 1.0
    assert KDTerm().weight_at(0) == 0.9


# ---- CRD memory --------------------------------------------------------------------------------
@pytest.mark.parametrize("negatives", [8, 16])  # 4·17 > 40 rows: the one-matmul path
def test_crd_memory_momentum_update_touches_only_the_batch_rows(negatives):
    term = make_term(CRDTerm, num_negatives=negatives)
    s, t = student_teacher()
    mem_s, mem_t = term.memory.memory_s.clone(), term.memory.memory_t.clone()
    term(s, t, TARGETS[INDEX], INDEX).backward()
    e_s, e_t = term.embed_s(s.embedding).detach(), term.embed_t(t.embedding).detach()
    others = torch.ones(40, dtype=torch.bool)
    others[INDEX] = False
    for before, after, e in ((mem_s, term.memory.memory_s, e_s), (mem_t, term.memory.memory_t, e_t)):
        expected = F.normalize(0.5 * before[INDEX] + 0.5 * e, dim=1)
        torch.testing.assert_close(after[INDEX], expected)
        assert torch.equal(after[others], before[others])
    assert term.memory.step == 1 and term.memory.z_s > 0 and term.memory.z_t > 0


def test_crd_memory_is_not_updated_in_eval_mode():
    term = make_term(CRDTerm).eval()
    before = term.memory.memory_s.clone()
    term(*student_teacher(), TARGETS[INDEX], INDEX)
    assert torch.equal(term.memory.memory_s, before) and term.memory.step == 0


def test_crd_negatives_come_from_other_classes_and_are_reproducible():
    memory = make_term(CRDTerm, seed=3).memory
    memory._move_to(torch.device("cpu"))
    idx = memory.sample(INDEX)
    assert idx.shape == (4, 9) and torch.equal(idx[:, 0], INDEX)
    assert (TARGETS[idx[:, 1:]] != TARGETS[INDEX].unsqueeze(1)).all()
    assert torch.equal(memory.sample(INDEX), idx)  # same step, same draw
    memory.step += 1
    assert not torch.equal(memory.sample(INDEX), idx)


def test_crd_duplicate_indices_keep_the_last_embedding():
    memory = make_term(CRDTerm).memory
    before = memory.memory_s.clone()
    e = F.normalize(torch.randn(3, 128), dim=1)
    memory.update(e, e, torch.tensor([7, 2, 7]))
    torch.testing.assert_close(memory.memory_s[7], F.normalize(0.5 * before[7] + 0.5 * e[2], dim=0))


def test_crd_state_dict_round_trip_carries_the_memory(tmp_path):
    term = make_term(CRDTerm)
    term(*student_teacher(), TARGETS[INDEX], INDEX)
    path = tmp_path / "term.pt"
    torch.save(term.state_dict(), path)
    fresh = make_term(CRDTerm)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    for a, b in ((term.memory, fresh.memory),):
        assert torch.equal(a.memory_s, b.memory_s) and torch.equal(a.memory_t, b.memory_t)
        assert (a.z_s, a.z_t, a.step) == (b.z_s, b.z_t, b.step)
    # the resumed term continues exactly: same negatives, same loss, same update
    s, t = student_teacher()
    torch.testing.assert_close(term(s, t, None, INDEX), fresh(s, t, None, INDEX))
    assert torch.equal(term.memory.memory_s, fresh.memory.memory_s)
    assert "memory.memory_s" not in term.state_dict() and not list(term.memory.buffers())


def test_crd_without_setup_data_says_so():
    term = CRDTerm(num_negatives=8)
    term.build(*student_teacher())
    with pytest.raises(RuntimeError, match="setup_data"):
        term(*student_teacher(), None, INDEX)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        term = make_term(CRDTerm)
        batch = 2 + rank  # unequal batches exercise the padded gather
        s = fake_output((4, 8, 16), (8, 4, 2), batch=batch, seed=rank)
        t = fake_output((6, 12, 24), (8, 4, 2), batch=batch, seed=10 + rank)
        term(s, t, None, torch.tensor([[1, 2], [3, 4, 5]][rank]))
        gathered = all_gather_cat(torch.tensor([rank] * (rank + 1)))
        torch.save({"memory": term.memory.get_extra_state(), "gathered": gathered}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_crd_memory_update_is_identical_on_every_ddp_rank(tmp_path):
    """Two gloo ranks: this process is rank 0, a spawned process rank 1."""
    import multiprocessing

    args = (2, str(tmp_path / "init"), str(tmp_path))
    child = multiprocessing.get_context("spawn").Process(target=_ddp_worker, args=(1, *args))
    child.start()
    try:
        _ddp_worker(0, *args)
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["gathered"], torch.tensor([0, 1, 1]))
    initial = make_term(CRDTerm).memory.get_extra_state()
    for key in ("memory_s", "memory_t"):
        assert torch.equal(r0["memory"][key], r1["memory"][key])
        changed = (r0["memory"][key] != initial[key]).any(1)
        assert changed.nonzero().flatten().tolist() == [1, 2, 3, 4, 5]  # both ranks' rows
    assert r0["memory"]["z_s"] == r1["memory"]["z_s"]
