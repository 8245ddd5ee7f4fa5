"""The constraint-weight rules on a problem whose constrained optimum is known in closed form.

minimise ||w - (2, 2)||^2  s.t.  L_1(w) - L_1(w_old) <= 0,  L_2(w) - L_2(w_old) <= 0.75,
with L_k(w) = w_k^2 and w_old = (1, 0.5): the optimum is w* = (1, 1), both constraints active, with
multipliers lambda* = (1, 1). The training loss is built exactly as in safespec's trainer,
objective + sum_k weight_k * L_k(w), with the weights from the method classes (safespec.train.methods).
"""

import pytest
import torch

from safespec.plan import load_plan
from safespec.spec import METHODS
from safespec.train import REGISTRY, Lagrangian, Method, Penalty, Replay, build_method

A = torch.tensor([2.0, 2.0])
W_OLD = torch.tensor([1.0, 0.5])
EPS = torch.tensor([0.0, 0.75])


def losses(w):
    return w**2


def solve(cw: Method, steps: int, lr: float, subsample: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = W_OLD.clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=lr)
    ref = losses(W_OLD)
    tail = torch.zeros(2)  # Polyak average of the last half of the iterates
    for step in range(steps):
        present = torch.ones(2, dtype=torch.bool)
        if subsample:  # only some constraints are seen per step, as with sampled protected classes
            present = torch.rand(2, generator=g) < 0.5
        L = losses(w)
        c = (L - ref).detach() - EPS
        weight = cw.weight(c, present, step)
        loss = ((w - A) ** 2).sum() + (weight * L)[present].sum() / present.sum().clamp(min=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= steps // 2:
            tail += w.detach() / (steps - steps // 2)
    return tail


def test_penalty_reaches_the_constrained_optimum():
    cw = Penalty(2, beta=200.0, gamma=1.0)
    w = solve(cw, 3000, lr=0.002)
    assert torch.allclose(w, torch.tensor([1.0, 1.0]), atol=0.02), w
    # the squared penalty leaves a violation of order lambda*/beta, never a large one
    assert (losses(w) - losses(W_OLD) - EPS).max() < 0.02


def test_lagrangian_reaches_the_optimum_and_the_multipliers():
    cw = Lagrangian(2, multiplier_lr=0.5, gamma=1.0)
    w = solve(cw, 4000, lr=0.01)
    assert torch.allclose(w, torch.tensor([1.0, 1.0]), atol=0.01), w
    # KKT: 2 (w_k - 2) + 2 lambda_k w_k = 0 at w_k = 1  =>  lambda_k = 1; the loss averages the weighted
    # constraint terms over the constraints in the batch (as the trainer does), so each multiplier is K = 2 times it
    assert torch.allclose(cw.lam, torch.tensor([2.0, 2.0]), atol=0.05), cw.lam


def test_lagrangian_with_moving_averages_and_sampled_constraints():
    cw = Lagrangian(2, multiplier_lr=0.05, gamma=0.8)
    w = solve(cw, 6000, lr=0.002, subsample=True)
    assert torch.allclose(w, torch.tensor([1.0, 1.0]), atol=0.03), w


def test_unconstrained_objective_alone_ignores_the_constraints():
    cw = Penalty(2, beta=1e-9, gamma=1.0)
    w = solve(cw, 3000, lr=0.01)
    assert torch.allclose(w, A, atol=0.01)


def test_first_visit_sets_u_and_unseen_constraints_keep_their_state():
    cw = Penalty(3, beta=10.0, gamma=0.8)
    cw.weight(torch.tensor([0.5, -1.0, 9.0]), torch.tensor([True, True, False]), 0)
    assert cw.u.tolist() == [0.5, -1.0, 0.0] and cw.seen.tolist() == [True, True, False]
    w = cw.weight(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([True, False, True]), 1)
    assert cw.u[0].item() == pytest.approx(0.2 * 0.5 + 0.8 * 1.0)
    assert cw.u[1].item() == -1.0  # not in the batch: untouched
    assert cw.u[2].item() == 2.0  # first visit
    assert w.tolist() == pytest.approx([10 * 0.9, 0.0, 20.0])


def test_hinge_form_and_cosine_beta():
    cw = Penalty(2, beta=100.0, gamma=1.0, form="hinge", schedule="cosine", total_steps=100)
    assert cw.weight(torch.tensor([0.3, -0.1]), torch.ones(2, dtype=torch.bool), 0).tolist() == [0.0, 0.0]
    w = cw.weight(torch.tensor([0.3, -0.1]), torch.ones(2, dtype=torch.bool), 50)
    assert w.tolist() == pytest.approx([50.0, 0.0])


def test_replay_weights_are_constant_and_ignore_the_reference():
    cw = Replay(2, beta=5.0)
    assert cw.weight(torch.tensor([-3.0, 3.0]), torch.ones(2, dtype=torch.bool), 0).tolist() == [5.0, 5.0]


@pytest.mark.parametrize(
    ("cls", "kw"),
    [
        (Penalty, dict(gamma=0.0)),
        (Penalty, dict(gamma=1.5)),
        (Penalty, dict(beta=-1.0)),
        (Penalty, dict(form="cubic")),
        (Penalty, dict(schedule="linear")),
        (Lagrangian, dict(gamma=0.0)),
        (Lagrangian, dict(multiplier_lr=0.0)),
        (Lagrangian, dict(rho=-1.0)),
        (Replay, dict(beta=0.0)),
    ],
)
def test_invalid_settings_fail_at_construction(cls, kw):
    with pytest.raises(ValueError):
        cls(2, **kw)


def test_the_registry_has_one_class_per_method_of_the_spec_language():
    assert tuple(REGISTRY) == METHODS
    assert all(REGISTRY[name].name == name for name in METHODS)
    with pytest.raises(ValueError, match="unknown method 'adam'"):
        build_method("adam", None, 2)


def test_each_method_reads_its_own_settings_from_the_plan():
    """build() hands each method its own section of the plan, and only the constrained methods select
    among admissible candidates."""
    from pathlib import Path

    _, plan = load_plan(Path(__file__).parent / "specs" / "good.yaml", check_files=False)
    o = plan.optimizer.updated({"penalty.beta": 7.0, "lagrangian.multiplier_lr": 3.0, "lagrangian.rho": 0.5})
    pen, lag, rep = (build_method(n, o, 4) for n in ("penalty", "lagrangian", "replay"))
    assert isinstance(pen, Penalty) and (pen.beta, pen.total_steps) == (7.0, o.steps)
    assert isinstance(lag, Lagrangian) and (lag.multiplier_lr, lag.rho) == (3.0, 0.5)
    assert isinstance(rep, Replay) and rep.beta == 7.0
    assert [n for n in METHODS if REGISTRY[n].constrained] == ["penalty", "lagrangian"]
    assert not REGISTRY["unconstrained"].draws_store and not REGISTRY["replay"].uses_reference
    with pytest.raises(KeyError, match="penalty.bta"):
        plan.optimizer.updated({"penalty.bta": 1.0})
