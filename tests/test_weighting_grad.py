"""Gradient-balancing methods (mtlfast.weighting: PCGrad, MGDA-UB, CAGrad, IMTL-G, GradNorm, Nash-MTL, TorchJD).

Every method computes weights from the task Gram matrix and steps with one backward of Σ w_t L_t. The oracle is
each paper's algorithm written literally on explicit gradient vectors: a tiny float64 encoder + MultiTaskHeads with
four mixed tasks, whose task losses are recomputed with torch.nn.functional on ``heads.logits(h)`` and
differentiated one task at a time (T backward passes) w.r.t. the representation h and the encoder parameters.
For each method:
  (a) Σ_t w_t g_t on the representation equals the naive vector result;
  (b) after ``method(out).backward()`` the encoder's .grad is the naive aggregated gradient backpropagated from h;
  (c) mode="parameters" equals the naive method applied to the parameter gradients (and so does the .grad).
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtlfast as mf
from mtlfast.weighting import CAGrad, GradNorm, IMTLG, MGDAUB, NashMTL, PCGrad, TorchJDWeighting
from mtlfast.weighting.pcgrad import pcgrad_task_orders

IN, D, N = 5, 6, 10
TASKS = [
    mf.Classification("topic", num_classes=3),
    mf.Binary("spam"),
    mf.MultiLabel("tags", num_labels=3),
    mf.Regression("score", dim=2),
]
T = len(TASKS)
MODES = ["representation", "parameters"]


# ---------------------------------------------------------------------------------------------------------------
# The model and the naive per-task gradients


@dataclass
class Problem:
    encoder: nn.Module
    heads: mf.MultiTaskHeads
    x: torch.Tensor
    targets: dict[str, torch.Tensor]

    def shared(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())


def make_problem(seed: int = 0, *, absent: tuple[str, ...] = (), unlabelled: tuple[str, ...] = ()) -> Problem:
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(IN, D), nn.Tanh()).double()
    heads = mf.MultiTaskHeads(D, TASKS, dtype=torch.float64)
    problem = Problem(encoder, heads, torch.empty(0), {})
    new_batch(problem, seed, absent=absent, unlabelled=unlabelled)
    return problem


def new_batch(problem: Problem, seed: int, *, absent=(), unlabelled=()) -> None:
    gen = torch.Generator().manual_seed(1000 + seed)
    problem.x = torch.randn(N, IN, generator=gen, dtype=torch.float64)
    targets = {
        "topic": torch.randint(0, 3, (N,), generator=gen),
        "spam": (torch.rand(N, generator=gen) < 0.5).double(),
        "tags": (torch.rand(N, 3, generator=gen) < 0.5).double(),
        "score": 2 * torch.randn(N, 2, generator=gen, dtype=torch.float64),
    }
    if "topic" in unlabelled:
        targets["topic"] = torch.full((N,), -100)
    problem.targets = {name: y for name, y in targets.items() if name not in absent}


def naive_losses(problem: Problem, h: torch.Tensor) -> torch.Tensor:
    """(T,) task losses written with torch.nn.functional on the heads' plain logits (0 for absent tasks)."""
    logits = problem.heads.logits(h)
    losses = []
    for task in TASKS:
        y = problem.targets.get(task.name)
        z = logits[task.name]
        if y is None or (task.name == "topic" and bool((y == -100).all())):
            losses.append(z.sum() * 0)
        elif task.name == "topic":
            losses.append(F.cross_entropy(z, y))
        elif task.name in ("spam", "tags"):
            losses.append(F.binary_cross_entropy_with_logits(z, y))
        else:
            losses.append(F.mse_loss(z, y))
    return torch.stack(losses)


@dataclass
class NaiveGradients:
    representation: torch.Tensor  # (T, N·D): dL_t/dh, one backward pass per task
    parameters: torch.Tensor  # (T, P): dL_t/dθ_encoder
    losses: torch.Tensor  # (T,)
    h: torch.Tensor  # the representation (in the encoder's graph)

    def of(self, mode: str) -> torch.Tensor:
        return self.representation if mode == "representation" else self.parameters


def naive_gradients(problem: Problem) -> NaiveGradients:
    h = problem.encoder(problem.x)
    losses = naive_losses(problem, h)
    params = problem.shared()
    rep, par = [], []
    for t in range(T):
        grads = torch.autograd.grad(losses[t], [h, *params], retain_graph=True, allow_unused=True)
        rep.append(grads[0].flatten())
        flat = [torch.zeros_like(p).flatten() if g is None else g.flatten() for p, g in zip(params, grads[1:])]
        par.append(torch.cat(flat))
    return NaiveGradients(torch.stack(rep), torch.stack(par), losses.detach(), h)


def backprop_from_h(problem: Problem, naive: NaiveGradients, vector: torch.Tensor) -> torch.Tensor:
    """J^T v: the encoder gradient obtained by backpropagating ``vector`` (N·D,) from the representation."""
    grads = torch.autograd.grad(naive.h, problem.shared(), grad_outputs=vector.view_as(naive.h), retain_graph=True)
    return torch.cat([g.flatten() for g in grads])


@dataclass
class Step:
    weights: torch.Tensor  # (T,) the weights the method applied
    encoder_grad: torch.Tensor  # (P,) flattened .grad of the encoder after total.backward()
    total: torch.Tensor


def run_method(problem: Problem, method: nn.Module) -> Step:
    """One training step through the fused op: total = method(out); total.backward()."""
    for p in [*problem.encoder.parameters(), *problem.heads.parameters(), *method.parameters()]:
        p.grad = None
    h = problem.encoder(problem.x)
    out = problem.heads(h, problem.targets, per_task_input_grads=True)
    total = method(out)
    total.backward()
    grad = torch.cat([p.grad.flatten() for p in problem.encoder.parameters()])
    return Step(method.task_weights.detach().clone(), grad, total.detach())


def build(cls, problem: Problem, mode: str, **kwargs) -> nn.Module:
    shared = problem.shared() if mode == "parameters" else None
    return cls(T, mode=mode, shared_parameters=shared, **kwargs).double()


def assert_vectors_close(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor | float, tol: float,
                         what: str) -> None:
    error = (actual - expected).abs().max().item()
    assert error <= tol * float(scale), f"{what}: max error {error:.3g} > {tol:g} × {float(scale):.3g}"


def check_against_naive(problem: Problem, naive: NaiveGradients, step: Step, mode: str, expected: torch.Tensor,
                        tol: float = 1e-9) -> None:
    """(a)/(c): the method's Σ w_t g_t equals the naive vector result; (b): so does the encoder gradient."""
    vectors = naive.of(mode)
    scale = vectors.norm(dim=1).max()
    assert torch.isfinite(step.weights).all()
    assert_vectors_close(step.weights @ vectors, expected, scale, tol, f"{mode}: Σ w_t g_t vs naive")
    expected_grad = backprop_from_h(problem, naive, expected) if mode == "representation" else expected
    grad_scale = expected_grad.abs().max().clamp_min(1e-300) if mode == "representation" else scale
    assert_vectors_close(step.encoder_grad, expected_grad, grad_scale, max(tol, 1e-9), f"{mode}: encoder .grad")


# ---------------------------------------------------------------------------------------------------------------
# PCGrad


def naive_pcgrad(vectors: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of Yu et al., literally: project each g_i in turn on the normal plane of every conflicting g_j."""
    projected = []
    for i in range(vectors.shape[0]):
        g_i = vectors[i].clone()
        for j in orders[i].tolist():
            g_j = vectors[j]
            if j == i or float(g_j @ g_j) == 0.0:
                continue
            dot = g_i @ g_j
            if dot < 0:
                g_i = g_i - dot / (g_j @ g_j) * g_j
        projected.append(g_i)
    return torch.stack(projected).sum(0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_pcgrad_matches_vector_algorithm(mode, seed):
    problem = make_problem(seed)
    naive = naive_gradients(problem)
    gram = naive.of(mode) @ naive.of(mode).T
    assert (gram < 0).any(), "the case must contain conflicting gradients"
    method = build(PCGrad, problem, mode, seed=seed)
    orders = method.task_orders()
    expected = naive_pcgrad(naive.of(mode), orders)
    step = run_method(problem, method)
    check_against_naive(problem, naive, step, mode, expected)
    assert int(method.rng_step) == 1
    # the next step uses other orders, again as the vector algorithm does
    next_orders = method.task_orders()
    step = run_method(problem, method)
    check_against_naive(problem, naive, step, mode, naive_pcgrad(naive.of(mode), next_orders))


def test_pcgrad_two_dimensional_toy():
    conflicting = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # g1 - (-1/2) g2 = (0.5, 0.5) = g1 + 0.5 g2 ;  g2 - (-1/1) g1 = (0, 1) = g1 + g2  →  w = (2, 1.5)
    weights = PCGrad(2).weights_from_gram(conflicting @ conflicting.T, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor([2.0, 1.5], dtype=torch.float64))
    torch.testing.assert_close(weights @ conflicting, torch.tensor([0.5, 1.5], dtype=torch.float64))
    aligned = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    weights = PCGrad(2).weights_from_gram(aligned @ aligned.T, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(weights, torch.ones(2, dtype=torch.float64))


def test_pcgrad_random_orders_are_seeded_permutations():
    orders = [pcgrad_task_orders(PCGrad(5, seed=7).rng_key, step, 5) for step in range(20)]
    for order in orders:
        assert torch.equal(order.sort(dim=1).values, torch.arange(5).expand(5, 5))
    assert len({tuple(o.flatten().tolist()) for o in orders}) > 15, "orders must change from step to step"
    first_positions = torch.stack([o[:, 0] for o in orders])
    assert len(set(first_positions.flatten().tolist())) == 5
    other_seed = [pcgrad_task_orders(PCGrad(5, seed=8).rng_key, step, 5) for step in range(3)]
    assert not all(torch.equal(a, b) for a, b in zip(other_seed, orders))
    assert all(torch.equal(a, pcgrad_task_orders(PCGrad(5, seed=7).rng_key, step, 5)) for step, a in enumerate(orders))


def test_pcgrad_state_dict_resumes_the_order_stream_and_eval_does_not_consume():
    vectors = torch.randn(4, 9, dtype=torch.float64)
    gram, losses = vectors @ vectors.T, torch.ones(4, dtype=torch.float64)
    run = PCGrad(4, seed=3)
    for _ in range(3):
        run.weights_from_gram(gram, losses)
    resumed = PCGrad(4, seed=99)
    resumed.load_state_dict(run.state_dict())
    assert torch.equal(resumed.task_orders(), run.task_orders())
    run.eval()
    before = run.task_orders().clone()
    run.weights_from_gram(gram, losses)
    assert torch.equal(run.task_orders(), before)


# ---------------------------------------------------------------------------------------------------------------
# MGDA


def exact_min_norm(vectors: torch.Tensor) -> torch.Tensor:
    """The min-norm element of the convex hull of the non-zero rows, by enumerating supports: for a support S, the
    KKT system [2 K_SS 1; 1ᵀ 0][α; μ] = [0; 1]; the best feasible (α ≥ 0) one is the optimum."""
    keep = [t for t in range(vectors.shape[0]) if float(vectors[t].norm()) > 0]
    gram = vectors @ vectors.T
    best = None
    for size in range(1, len(keep) + 1):
        for support in itertools.combinations(keep, size):
            s = list(support)
            kkt = torch.zeros(size + 1, size + 1, dtype=vectors.dtype)
            kkt[:size, :size] = 2 * gram[s][:, s]
            kkt[:size, size] = 1
            kkt[size, :size] = 1
            singular = torch.linalg.svdvals(kkt)
            if singular.min() < 1e-12 * singular.max():
                continue
            rhs = torch.zeros(size + 1, dtype=vectors.dtype)
            rhs[size] = 1
            alpha_s = torch.linalg.solve(kkt, rhs)[:size]
            if (alpha_s < -1e-12).any():
                continue
            alpha = torch.zeros(vectors.shape[0], dtype=vectors.dtype)
            alpha[s] = alpha_s.clamp_min(0)
            value = alpha @ gram @ alpha
            if best is None or value < best[0]:
                best = (value, alpha)
    return best[1]


def naive_normalizers(vectors: torch.Tensor, losses: torch.Tensor, normalization: str) -> torch.Tensor:
    norms = vectors.norm(dim=1)
    divisor = {"none": torch.ones_like(norms), "l2": norms, "loss": losses, "loss+": losses * norms}[normalization]
    return torch.where(divisor > 0, divisor, torch.ones_like(divisor))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_mgda_matches_min_norm_point(mode, normalization):
    problem = make_problem(2)
    naive = naive_gradients(problem)
    vectors = naive.of(mode)
    # Sener & Koltun's code: α is the min-norm point of the normalised gradients, applied to the raw losses.
    alpha = exact_min_norm(vectors / naive_normalizers(vectors, naive.losses, normalization).unsqueeze(1))
    step = run_method(problem, build(MGDAUB, problem, mode, normalization=normalization, iterations=200))
    check_against_naive(problem, naive, step, mode, alpha @ vectors, tol=1e-7)
    assert_vectors_close(step.weights, alpha, 1.0, 1e-6, "α")


def test_mgda_two_tasks_closed_form():
    # For two vectors the min-norm point of [g1, g2] is γ g1 + (1 − γ) g2, γ = clip((g2 − g1)·g2 / ||g1 − g2||², 0, 1).
    gen = torch.Generator().manual_seed(0)
    cases = [torch.randn(2, 5, generator=gen, dtype=torch.float64) for _ in range(5)]
    cases.append(torch.tensor([[1.0, 0.0], [2.0, 0.5]], dtype=torch.float64))  # g1·g2 ≥ ||g1||²: γ = 1
    cases.append(torch.tensor([[2.0, 0.5], [1.0, 0.0]], dtype=torch.float64))  # γ = 0
    for vectors in cases:
        g1, g2 = vectors
        gamma = ((g2 - g1) @ g2 / (g1 - g2).square().sum()).clamp(0, 1)
        weights = MGDAUB(2).weights_from_gram(vectors @ vectors.T, torch.ones(2, dtype=torch.float64))
        torch.testing.assert_close(weights, torch.stack([gamma, 1 - gamma]), rtol=1e-12, atol=1e-12)


def test_mgda_weights_satisfy_the_optimality_conditions_on_random_problems():
    # The min-norm point's KKT conditions: (Kα)_t ≥ αᵀKα for every task, with equality on the support.
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        shared = torch.randn(1, 8, generator=gen, dtype=torch.float64)
        vectors = torch.randn(5, 8, generator=gen, dtype=torch.float64) + shared
        gram = vectors @ vectors.T
        alpha = MGDAUB(5, iterations=250).weights_from_gram(gram, torch.ones(5, dtype=torch.float64))
        assert alpha.min() >= 0 and abs(float(alpha.sum()) - 1) < 1e-12
        k_alpha, value = gram @ alpha, alpha @ gram @ alpha
        assert (k_alpha >= value - 1e-8 * gram.diagonal().max()).all()
        assert ((k_alpha - value).abs()[alpha > 1e-9] <= 1e-8 * gram.diagonal().max()).all()
        torch.testing.assert_close(alpha, exact_min_norm(vectors), rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# CAGrad


def cagrad_objective(vectors: torch.Tensor, w: torch.Tensor, c: float) -> torch.Tensor:
    """The paper's dual objective on explicit vectors: g_wᵀ g_0 + √φ ||g_w||, φ = c²||g_0||²."""
    g0 = vectors.mean(0)
    g_w = w @ vectors
    return g_w @ g0 + c * g0.norm() * g_w.norm()


def naive_cagrad_dual(vectors: torch.Tensor, c: float, iterations: int = 4000) -> torch.Tensor:
    """An independent solver: exponentiated-gradient (mirror) descent on the simplex, autograd on the vectors."""
    w = torch.full((vectors.shape[0],), 1.0 / vectors.shape[0], dtype=vectors.dtype)
    step = 1.0 / vectors.norm(dim=1).max().square()
    for _ in range(iterations):
        w = w.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(cagrad_objective(vectors, w, c), w)
        w = w * torch.exp(-step * grad)
        w = w / w.sum()
    return w.detach()


def naive_cagrad_update(vectors: torch.Tensor, w: torch.Tensor, c: float) -> torch.Tensor:
    g0 = vectors.mean(0)
    g_w = w @ vectors
    return (g0 + c * g0.norm() / g_w.norm() * g_w) / (1 + c * c)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("c", [0.4, 0.9])
def test_cagrad_solves_the_dual_and_matches_the_vector_update(mode, c):
    problem = make_problem(3)
    naive = naive_gradients(problem)
    vectors = naive.of(mode)
    method = build(CAGrad, problem, mode, c=c)
    dual = method.solve_dual(vectors @ vectors.T)
    # w* is optimal: the literal objective's gradient (autograd on the vectors) meets the simplex KKT conditions…
    w = dual.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(cagrad_objective(vectors, w, c), w)
    multiplier = grad @ dual
    scale = grad.abs().max()
    assert (grad >= multiplier - 1e-7 * scale).all(), (grad, multiplier)
    assert ((grad - multiplier).abs()[dual > 1e-8] <= 1e-7 * scale).all(), (grad, multiplier, dual)
    # …and no better than an independent solver's point
    reference = naive_cagrad_dual(vectors, c)
    assert cagrad_objective(vectors, dual, c) <= cagrad_objective(vectors, reference, c) + 1e-10 * scale
    assert_vectors_close(dual @ vectors, reference @ vectors, vectors.norm(dim=1).max(), 1e-3, "g_w* vs mirror descent")
    step = run_method(problem, method)
    check_against_naive(problem, naive, step, mode, naive_cagrad_update(vectors, dual, c), tol=1e-9)


def test_cagrad_with_c_zero_is_the_mean_gradient():
    problem = make_problem(4)
    naive = naive_gradients(problem)
    step = run_method(problem, build(CAGrad, problem, "representation", c=0.0))
    check_against_naive(problem, naive, step, "representation", naive.representation.mean(0))
    torch.testing.assert_close(step.weights, torch.full((T,), 1 / T, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# IMTL-G


def naive_imtlg(vectors: torch.Tensor) -> torch.Tensor:
    """Liu et al. (ICLR 2021), Eq. 5: α_{2:} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 − Σ α_{2:}; the update Σ α_t g_t."""
    units = vectors / vectors.norm(dim=1, keepdim=True)
    differences = vectors[0] - vectors[1:]
    unit_differences = units[0] - units[1:]
    rest = vectors[0] @ unit_differences.T @ torch.linalg.inv(differences @ unit_differences.T)
    alpha = torch.cat([(1 - rest.sum()).unsqueeze(0), rest])
    return alpha @ vectors


@pytest.mark.parametrize("mode", MODES)
def test_imtlg_matches_the_closed_form(mode):
    problem = make_problem(5)
    naive = naive_gradients(problem)
    step = run_method(problem, build(IMTLG, problem, mode))
    check_against_naive(problem, naive, step, mode, naive_imtlg(naive.of(mode)), tol=1e-8)
    assert abs(float(step.weights.sum()) - 1) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_imtlg_update_has_equal_projections_on_unit_gradients(dtype):
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        scales = torch.tensor([[0.1], [1.0], [3.0], [10.0]], dtype=torch.float64)
        vectors = torch.randn(4, 7, generator=gen, dtype=torch.float64) * scales
        weights = IMTLG(4).weights_from_gram((vectors @ vectors.T).to(dtype), torch.ones(4, dtype=dtype)).double()
        update = weights @ vectors
        projections = (vectors / vectors.norm(dim=1, keepdim=True)) @ update
        tol = 1e-10 if dtype == torch.float64 else 5e-5
        assert (projections - projections.mean()).abs().max() <= tol * projections.abs().max()
        assert projections.min() > 0


def test_imtlg_singular_systems_give_finite_weights():
    # Linearly dependent gradients (T > dimension; a duplicated task): the paper's matrix is singular.
    duplicated = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    cases = [torch.randn(4, 2, dtype=torch.float64), duplicated]
    for vectors in cases:
        for dtype in (torch.float64, torch.float32):
            count = vectors.shape[0]
            weights = IMTLG(count).weights_from_gram((vectors @ vectors.T).to(dtype), torch.ones(count, dtype=dtype))
            assert torch.isfinite(weights).all(), weights
    # the duplicated task: equal projections still hold for the aggregated update
    vectors = cases[1]
    update = IMTLG(3).weights_from_gram(vectors @ vectors.T, torch.ones(3, dtype=torch.float64)) @ vectors
    projections = (vectors / vectors.norm(dim=1, keepdim=True)) @ update
    torch.testing.assert_close(projections, projections.mean().expand(3), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Nash-MTL


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8])
def test_nash_solves_the_bargaining_equation(dtype, num_tasks):
    gen = torch.Generator().manual_seed(num_tasks)
    for trial in range(5):
        scales = torch.logspace(-2, 2, num_tasks, dtype=torch.float64)[torch.randperm(num_tasks, generator=gen)]
        vectors = torch.randn(num_tasks, num_tasks + 4, generator=gen, dtype=torch.float64) * scales.unsqueeze(1)
        if trial % 2:  # correlated gradients
            shared = torch.randn(1, num_tasks + 4, generator=gen, dtype=torch.float64)
            vectors = vectors + 3 * scales.unsqueeze(1) * shared
        gram = vectors @ vectors.T
        method = NashMTL(num_tasks, normalize=False)
        alpha = method.weights_from_gram(gram.to(dtype), torch.ones(num_tasks, dtype=dtype))
        assert (alpha > 0).all()
        residual = alpha.double() * (gram @ alpha.double()) - 1  # K α = 1/α, scale-free
        assert residual.abs().max() <= (1e-10 if dtype == torch.float64 else 1e-4), residual


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [False, True])
def test_nash_update_is_the_bargaining_solution_on_vectors(mode, normalize):
    problem = make_problem(6)
    naive = naive_gradients(problem)
    vectors = naive.of(mode)
    step = run_method(problem, build(NashMTL, problem, mode, normalize=normalize))
    alpha = step.weights
    update = alpha @ vectors
    # the paper's condition g_tᵀ Δ = 1/α_t (on K/||K||_F for the official normalisation)
    size = (vectors @ vectors.T).norm() if normalize else torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(vectors @ update / size, 1 / alpha, rtol=1e-9, atol=0)
    check_against_naive(problem, naive, step, mode, update)


# ---------------------------------------------------------------------------------------------------------------
# GradNorm


def test_gradnorm_theta_gradient_and_step_match_a_hand_computation():
    problem = make_problem(7)
    method = GradNorm(T, alpha=1.5).double()
    theta = torch.tensor([0.3, -0.2, 0.5, 0.0], dtype=torch.float64)
    with torch.no_grad():
        method.logits.copy_(theta)
    first = naive_gradients(problem)
    run_method(problem, method)  # records L(0)
    torch.testing.assert_close(method.initial_losses, first.losses, rtol=1e-12, atol=0)
    new_batch(problem, 8)
    naive = naive_gradients(problem)
    step = run_method(problem, method)
    # by hand: w = T softmax(θ), G_t = w_t ||g_t||, r_t = L̃_t / mean L̃, L_grad = Σ |G_t − Ḡ r_t^α|
    w = T * torch.softmax(theta, 0)
    norms = naive.representation.norm(dim=1)
    G = w * norms
    ratio = naive.losses / first.losses
    target = G.mean() * (ratio / ratio.mean()) ** 1.5
    dloss_dw = torch.sign(G - target) * norms
    jacobian = torch.diag(w) - torch.outer(w, w) / T  # dw/dθ for w = T softmax(θ)
    torch.testing.assert_close(method.logits.grad, jacobian @ dloss_dw, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(step.total, (w * naive.losses).sum() + (G - target).abs().sum(), rtol=1e-10, atol=0)
    check_against_naive(problem, naive, step, "representation", w @ naive.representation)
    torch.testing.assert_close(method.initial_losses, first.losses, rtol=1e-12, atol=0)  # recorded once


def test_gradnorm_parameters_mode_uses_parameter_gradient_norms():
    problem = make_problem(9)
    method = build(GradNorm, problem, "parameters", alpha=0.5)
    run_method(problem, method)
    new_batch(problem, 10)
    naive = naive_gradients(problem)
    with torch.no_grad():
        method.logits.copy_(torch.tensor([0.1, 0.2, -0.3, 0.4]))
    step = run_method(problem, method)
    w = method.learned_weights().detach()
    check_against_naive(problem, naive, step, "parameters", w @ naive.parameters)
    norms = naive.parameters.norm(dim=1)
    G = w * norms
    ratio = naive.losses / method.initial_losses
    target = G.mean() * (ratio / ratio.mean()) ** 0.5
    jacobian = torch.diag(w) - torch.outer(w, w) / T
    torch.testing.assert_close(method.logits.grad, jacobian @ (torch.sign(G - target) * norms), rtol=1e-9, atol=1e-12)


def test_gradnorm_weights_stay_positive_and_sum_to_t():
    problem = make_problem(11)
    method = GradNorm(T, alpha=1.5).double()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5)
    for seed in range(6):
        new_batch(problem, seed)
        run_method(problem, method)
        optimizer.step()
        weights = method.learned_weights()
        assert (weights > 0).all()
        torch.testing.assert_close(weights.sum(), torch.tensor(float(T), dtype=torch.float64))
    assert not torch.allclose(method.learned_weights(), torch.ones(T, dtype=torch.float64)), "θ must have moved"


def test_gradnorm_records_a_task_initial_loss_when_it_first_appears():
    problem = make_problem(12, absent=("spam",))
    method = GradNorm(T).double()
    run_method(problem, method)
    assert method.initial_recorded.tolist() == [True, False, True, True]
    assert float(method.initial_losses[1]) == 0.0
    new_batch(problem, 13)
    naive = naive_gradients(problem)
    run_method(problem, method)
    assert method.initial_recorded.all()
    assert float(method.initial_losses[1]) == pytest.approx(float(naive.losses[1]), rel=1e-12)
    recorded = method.initial_losses.clone()
    for seed, absent in ((14, ("spam",)), (15, ())):  # absent again, then back: L(0) is not recorded anew
        new_batch(problem, seed, absent=absent)
        run_method(problem, method)
        assert torch.equal(method.initial_losses, recorded)


# ---------------------------------------------------------------------------------------------------------------
# Inactive tasks, all methods


ALL_METHODS = {
    "pcgrad": lambda: PCGrad(T),
    "mgda": lambda: MGDAUB(T, iterations=200),
    "mgda_l2": lambda: MGDAUB(T, normalization="l2", iterations=200),
    "cagrad": lambda: CAGrad(T),
    "imtlg": lambda: IMTLG(T),
    "nash": lambda: NashMTL(T),
    "gradnorm": lambda: GradNorm(T),
}


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
@pytest.mark.parametrize("inactive", ["absent", "unlabelled"])
def test_inactive_task_gets_weight_zero_and_the_others_are_unchanged(name, inactive):
    kwargs = {"absent": ("topic",)} if inactive == "absent" else {"unlabelled": ("topic",)}
    problem = make_problem(14, **kwargs)
    naive = naive_gradients(problem)
    assert float(naive.representation[0].norm()) == 0.0
    method = ALL_METHODS[name]().double()
    step = run_method(problem, method)
    assert torch.isfinite(step.weights).all() and torch.isfinite(step.encoder_grad).all()
    assert float(step.weights[0]) == 0.0
    # the other tasks' weights are what the method gives for the three active tasks alone
    active = naive.representation[1:]
    smaller = {"pcgrad": None, "mgda": MGDAUB(3, iterations=200),
               "mgda_l2": MGDAUB(3, normalization="l2", iterations=200), "cagrad": CAGrad(3), "imtlg": IMTLG(3),
               "nash": NashMTL(3), "gradnorm": GradNorm(3)}[name]
    if smaller is None:  # PCGrad: the random orders depend on T; compare with the vector algorithm instead
        expected = naive_pcgrad(naive.representation, pcgrad_task_orders(method.rng_key, 0, T))
        assert_vectors_close(step.weights @ naive.representation, expected, active.norm(dim=1).max(), 1e-9, "pcgrad")
    else:
        expected = smaller.double().weights_from_gram(active @ active.T, naive.losses[1:])
        torch.testing.assert_close(step.weights[1:], expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_tasks_inactive_gives_zero_weights(name, dtype):
    weights = ALL_METHODS[name]().weights_from_gram(torch.zeros(T, T, dtype=dtype), torch.zeros(T, dtype=dtype))
    assert weights.dtype == dtype
    assert torch.equal(weights, torch.zeros(T, dtype=dtype))


# ---------------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("make", [lambda: PCGrad(3, seed=5), lambda: MGDAUB(3, iterations=8),
                                  lambda: NashMTL(3, iterations=4), lambda: CAGrad(3, iterations=4), lambda: IMTLG(3)],
                         ids=["pcgrad", "mgda", "nash", "cagrad", "imtlg"])
def test_weights_from_gram_compiles_without_graph_breaks(make):
    vectors = torch.randn(3, 5)
    vectors[1] = -vectors[0] + 0.3 * vectors[1]
    gram, losses = vectors @ vectors.T, torch.rand(3)
    eager, compiled_module = make(), make()
    compiled = torch.compile(compiled_module.weights_from_gram, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # PCGrad's counter advances inside the compiled graph
        torch.testing.assert_close(compiled(gram, losses), eager.weights_from_gram(gram, losses), rtol=1e-5, atol=1e-6)
    for name, buffer in eager.named_buffers():
        assert torch.equal(buffer, dict(compiled_module.named_buffers())[name]), name


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("cls", [PCGrad, IMTLG])
def test_fused_op_and_method_compile_as_one_graph(cls):
    problem = make_problem(17)
    eager, compiled_module = cls(T).double(), cls(T).double()

    def step(method, h):
        return method(problem.heads(h, problem.targets, per_task_input_grads=True))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    h = problem.encoder(problem.x).detach()
    h_eager, h_compiled = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    step(eager, h_eager).backward()
    compiled(compiled_module, h_compiled).backward()
    torch.testing.assert_close(compiled_module.task_weights, eager.task_weights, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_compiled.grad, h_eager.grad, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# TorchJD adapter


class _EnumerationProjector:
    """A DualConeProjector for tests (quadprog is not installed): min vᵀGv s.t. v ≥ u, by enumerating which
    constraints are tight (exact for the few tasks used here)."""

    def __call__(self, U: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._project(u, G) for u in U.reshape(-1, U.shape[-1])]).reshape(U.shape)

    @staticmethod
    def _project(u: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        m = u.shape[0]
        best = None
        for free_count in range(m + 1):
            for free in itertools.combinations(range(m), free_count):
                fixed = [i for i in range(m) if i not in free]
                v = u.clone()
                if free:
                    f = list(free)
                    v[f] = -torch.linalg.pinv(G[f][:, f]) @ (G[f][:, fixed] @ u[fixed])
                if (v < u - 1e-12).any():
                    continue
                value = v @ G @ v
                if best is None or value < best[0] - 1e-15:
                    best = (value, v)
        return best[1]


def _torchjd_aggregators():
    aggregation = pytest.importorskip("torchjd.aggregation")
    projector_base = pytest.importorskip("torchjd.linalg").DualConeProjector
    projector = type("TestProjector", (_EnumerationProjector, projector_base), {})()
    return {
        "UPGrad": lambda: aggregation.UPGrad(projector=projector),
        "DualProj": lambda: aggregation.DualProj(projector=projector),
        "MGDA": lambda: aggregation.MGDA(),
        "IMTLG": lambda: aggregation.IMTLG(),
        "AlignedMTL": lambda: aggregation.AlignedMTL(),
    }


@pytest.mark.parametrize("name", ["UPGrad", "DualProj", "MGDA", "IMTLG", "AlignedMTL"])
@pytest.mark.parametrize("mode", MODES)
def test_torchjd_adapter_matches_torchjd_on_the_explicit_jacobian(name, mode):
    make = _torchjd_aggregators()[name]
    problem = make_problem(15)
    naive = naive_gradients(problem)
    expected = make()(naive.of(mode))  # TorchJD aggregates the Jacobian (rows: task gradients)
    shared = problem.shared() if mode == "parameters" else None
    step = run_method(problem, TorchJDWeighting(make(), T, mode=mode, shared_parameters=shared).double())
    check_against_naive(problem, naive, step, mode, expected, tol=1e-7)


def test_torchjd_adapter_skips_inactive_tasks_and_takes_a_weighting():
    aggregation = pytest.importorskip("torchjd.aggregation")
    problem = make_problem(16, absent=("score",))
    naive = naive_gradients(problem)
    step = run_method(problem, TorchJDWeighting(aggregation.IMTLGWeighting(), T).double())
    assert float(step.weights[3]) == 0.0
    check_against_naive(problem, naive, step, "representation", aggregation.IMTLG()(naive.representation[:3]), tol=1e-8)


def test_torchjd_adapter_rejects_jacobian_based_aggregators_and_missing_torchjd(monkeypatch):
    aggregation = pytest.importorskip("torchjd.aggregation")
    for method in (aggregation.GradDrop(), aggregation.ConFIG(), aggregation.MeanWeighting()):
        with pytest.raises(TypeError, match="^mtlfast: .*Gramian"):
            TorchJDWeighting(method, T)
    with pytest.raises(TypeError, match="^mtlfast: "):
        TorchJDWeighting(object(), T)
    monkeypatch.setitem(sys.modules, "torchjd", None)
    with pytest.raises(ImportError, match="^mtlfast: .*torchjd"):
        TorchJDWeighting(object(), T)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("make", [
    lambda: MGDAUB(3, iterations=0), lambda: MGDAUB(3, normalization="max"), lambda: CAGrad(3, c=-0.1),
    lambda: CAGrad(3, iterations=0), lambda: NashMTL(3, iterations=0), lambda: GradNorm(3, alpha=-1.0),
    lambda: GradNorm(3, alpha=math.nan), lambda: IMTLG(3, mode="last_layer"), lambda: PCGrad(3, mode="parameters"),
])
def test_bad_arguments_raise_value_errors(make):
    with pytest.raises(ValueError, match="^mtlfast: "):
        make()


def test_bad_seed_and_wrong_gram_shape():
    with pytest.raises(TypeError, match="^mtlfast: PCGrad seed"):
        PCGrad(3, seed=1.5)
    losses = torch.ones(3)
    for method in (PCGrad(3), GradNorm(3)):
        with pytest.raises(ValueError, match=r"^mtlfast: .*\(3, 3\) Gram matrix"):
            method(losses, gram=torch.eye(2))
