"""Tests of ``covguard.attacks`` on a tiny conv net trained in a few hundred milliseconds.

The classifier (normalization, conv, BatchNorm, ReLU, pooling, Dropout, linear) is trained once
per module on synthetic, separable 3x8x8 images whose class is written into them with a
per-image strength, so attacks of growing budget flip a growing share of them.

Every reference below is computed independently with ``torch.autograd`` in this file. A
comparison against torchattacks was skipped: torchattacks depends on torchvision, which this
project does not install.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from covguard.attacks import ATTACKS, BIM, FGSM, IGM, PGD, PGDL2, Attack, Mix, success_mask
from covguard.attacks.bim import kurakin_steps
from covguard.attacks.igm import integrated_gradient

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 8 / 255
LINF_TOL = 1e-6  # float32 rounding of x + delta


class _Normalize(nn.Module):
    """Fixed normalization, so the model takes [0, 1] images like every covguard model."""

    def forward(self, x: Tensor) -> Tensor:
        return (x - 0.5) / 0.25


def _make_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Images (n, 3, 8, 8): grey noise plus +-amp on the left/right halves, sign set by y."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    base = 0.5 + 0.1 * torch.randn(n, 3, 8, 8, generator=gen)
    amp = 0.004 + 0.04 * torch.rand(n, 1, 1, 1, generator=gen)  # per-image signal strength
    pattern = torch.ones(1, 1, 8, 8)
    pattern[..., 4:] = -1  # left half +1, right half -1
    sign = (2 * y - 1).float().view(-1, 1, 1, 1)  # (n, 1, 1, 1)
    return (base + amp * sign * pattern).clamp(0, 1), y


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Tensor, Tensor]:
    """A conv net trained to 100% accuracy on 256 images, returned in eval mode."""
    x, y = _make_data(256, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(
        _Normalize(),
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(32, 2),
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).all()
    return model, x, y


@pytest.fixture(scope="module")
def batch(trained) -> tuple[Tensor, Tensor]:
    """32 images of the training set with some pixels pinned at exactly 0 and 1."""
    _, x, y = trained
    x = x[:32].clone()
    x[:4, :, :2] = 0.0
    x[4:8, :, :2] = 1.0
    return x, y[:32].clone()


def _build(name: str, model: nn.Module, seed: int = 0) -> Attack | Mix:
    """Each attack with its defaults (seeded where it has randomness); "mix" mixes all five."""
    if name == "mix":
        attacks = [_build(key, model, seed) for key in ATTACKS]
        return Mix(attacks, generator=torch.Generator().manual_seed(seed))
    if name in ("pgd", "pgd_l2", "igm"):
        return ATTACKS[name](model, generator=torch.Generator().manual_seed(seed))
    return ATTACKS[name](model)


def _grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Reference input gradient of the summed cross-entropy."""
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y, reduction="sum")
    return torch.autograd.grad(loss, x)[0]


# --- budget, range, shape --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fgsm", "bim", "pgd", "igm"])
def test_linf_attacks_stay_in_budget_and_range(trained, batch, name):
    model, _, _ = trained
    x, y = batch
    x_adv = _build(name, model)(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    linf = (x_adv - x).abs().amax()
    assert linf <= EPS + LINF_TOL
    assert linf >= EPS - LINF_TOL  # the attack reaches the edge of the ball somewhere


@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_pgd_l2_stays_in_budget_and_range(trained, batch, eps):
    model, _, _ = trained
    x, y = batch
    x_adv = PGDL2(model, eps=eps, generator=torch.Generator().manual_seed(0))(x, y)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    norms = (x_adv - x).flatten(1).norm(dim=1)  # (N,)
    assert (norms <= eps + 1e-6).all()
    assert norms.max() >= 0.9 * eps  # ten steps of alpha=0.1 reach the sphere


def test_mix_images_stay_in_their_attacks_budget(trained, batch):
    model, _, _ = trained
    x, y = batch
    mix = _build("mix", model)
    x_adv = mix(x, y)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    names = list(ATTACKS)
    for i, index in enumerate(mix.last_assignment_.tolist()):
        diff = x_adv[i] - x[i]
        if names[index] == "pgd_l2":
            assert diff.norm() <= 0.5 + 1e-6
        else:
            assert diff.abs().max() <= EPS + LINF_TOL


# --- agreement with independent computations -------------------------------------------------


def test_pgd_one_step_from_x_with_alpha_eps_is_fgsm(trained, batch):
    model, _, _ = trained
    x, y = batch
    pgd = PGD(model, eps=EPS, alpha=EPS, steps=1, random_start=False)
    assert torch.equal(pgd(x, y), FGSM(model, eps=EPS)(x, y))


def test_fgsm_matches_autograd(trained, batch):
    model, _, _ = trained
    x, y = batch
    expected = (x + EPS * _grad(model, x, y).sign()).clamp(0, 1)
    assert torch.equal(FGSM(model, eps=EPS)(x, y), expected)


def test_bim_matches_reference_loop(trained, batch):
    model, _, _ = trained
    x, y = batch
    alpha, steps = 1 / 255, 10
    expected = x.clone()
    for _ in range(steps):
        stepped = expected + alpha * _grad(model, expected, y).sign()
        expected = torch.min(torch.max(stepped, x - EPS), x + EPS).clamp(0, 1)
    torch.testing.assert_close(BIM(model, eps=EPS)(x, y), expected, atol=1e-6, rtol=0)


def test_igm_with_m1_is_one_step_on_gradient_times_input(trained, batch):
    model, _, _ = trained
    x, y = batch
    alpha = 2 / 255
    direction = (x * _grad(model, x, y)).sign()
    expected = (x + (alpha * direction).clamp(-EPS, EPS)).clamp(0, 1)
    igm = IGM(model, eps=EPS, alpha=alpha, steps=1, m=1, random_start=False)
    assert torch.equal(igm(x, y), expected)
    assert (expected[:4, :, :2] == 0).all()  # black pixels have IG 0 and do not move


def test_integrated_gradient_matches_batched_reference(trained, batch):
    model, _, _ = trained
    x, y = batch
    m = 4
    ks = torch.arange(1, m + 1, dtype=x.dtype).view(m, 1, 1, 1, 1) / m  # (m, 1, 1, 1, 1)
    scaled = (ks * x).flatten(0, 1).requires_grad_(True)  # (m*N, C, H, W), all m paths at once
    loss = F.cross_entropy(model(scaled), y.repeat(m), reduction="sum")
    grads = torch.autograd.grad(loss, scaled)[0].view(m, *x.shape)  # (m, N, C, H, W)
    expected = x * grads.mean(dim=0)
    torch.testing.assert_close(integrated_gradient(model, x, y, m=m), expected)


def test_success_mask_matches_argmax(trained, batch):
    model, _, _ = trained
    x, y = batch
    x_adv = PGD(model, eps=4 / 255, alpha=1 / 255, random_start=False)(x, y)
    with torch.no_grad():
        expected = model(x_adv).argmax(dim=1) != y
    mask = success_mask(model, x_adv, y)
    assert mask.dtype == torch.bool and torch.equal(mask, expected)
    assert 0 < int(mask.sum()) < len(y)  # the batch holds both outcomes


def test_success_rate_does_not_decrease_with_eps(trained):
    model, x, y = trained
    rates = []
    for grey_levels in (1, 2, 4, 8, 16):
        eps = grey_levels / 255
        attack = PGD(model, eps=eps, alpha=eps / 4, generator=torch.Generator().manual_seed(0))
        rates.append(success_mask(model, attack(x, y), y).float().mean().item())
    assert all(a <= b for a, b in zip(rates, rates[1:])), rates
    assert rates[0] < 0.1 and rates[-1] > 0.9, rates


def test_attacks_do_not_depend_on_batch_composition(trained, batch):
    model, _, _ = trained
    x, y = batch
    for attack in (FGSM(model), BIM(model), IGM(model, m=3, random_start=False)):
        whole = attack(x, y)
        halves = torch.cat([attack(x[:11], y[:11]), attack(x[11:], y[11:])])
        torch.testing.assert_close(whole, halves, atol=1e-6, rtol=0)


# --- model state and inputs left alone -------------------------------------------------------


@pytest.mark.parametrize("name", [*ATTACKS, "mix"])
def test_model_state_restored_and_x_untouched(trained, batch, name):
    model = copy.deepcopy(trained[0]).train()
    model[2].eval()  # a frozen BatchNorm inside a model in train mode
    model[1].bias.requires_grad_(False)
    modes = [module.training for module in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    bn_state = {k: v.clone() for k, v in model[2].state_dict().items()}
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    x, y = batch
    x_before = x.clone()

    x_adv = _build(name, model)(x, y)

    assert seen and not any(seen)  # every forward pass ran in eval mode
    assert [module.training for module in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for key, value in model[2].state_dict().items():
        assert torch.equal(value, bn_state[key]), key
    assert torch.equal(x, x_before) and not x.requires_grad
    assert not x_adv.requires_grad


def test_model_mode_restored_when_the_model_raises(trained, batch):
    model = copy.deepcopy(trained[0]).train()
    x, y = batch
    with pytest.raises(IndexError):
        FGSM(model)(x, torch.full_like(y, 5))  # label 5 of a 2-class model
    assert all(module.training for module in model.modules())


def test_attack_inside_no_grad_block(trained, batch):
    model, _, _ = trained
    x, y = batch
    with torch.no_grad():
        inside = BIM(model)(x, y)
    assert torch.equal(inside, BIM(model)(x, y))


# --- randomness ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pgd", "pgd_l2", "igm", "mix"])
def test_reproducible_with_a_seeded_generator(trained, batch, name):
    model, _, _ = trained
    x, y = batch
    first, again, other = (_build(name, model, seed)(x, y) for seed in (0, 0, 1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("n", [1, 2, 7, 10, 32])
def test_mix_assignment_is_balanced_and_each_attack_does_its_share(trained, batch, n):
    model, _, _ = trained
    x, y = batch[0][:n], batch[1][:n]
    attacks = [FGSM(model), BIM(model), PGD(model, random_start=False)]
    mix = Mix(attacks, generator=torch.Generator().manual_seed(n))
    x_adv = mix(x, y)
    assignment = mix.last_assignment_
    assert assignment.dtype == torch.long and assignment.shape == (n,)
    counts = torch.bincount(assignment, minlength=len(attacks))
    assert counts.sum() == n and counts.max() - counts.min() <= 1
    for index, attack in enumerate(attacks):
        chosen = assignment == index
        if chosen.any():
            torch.testing.assert_close(x_adv[chosen], attack(x, y)[chosen], atol=1e-6, rtol=0)


def test_mix_assignment_changes_between_seeds(batch, trained):
    model, _, _ = trained
    x, y = batch
    assignments = []
    for seed in (0, 1):
        mix = Mix([FGSM(model), FGSM(model)], generator=torch.Generator().manual_seed(seed))
        mix(x, y)
        assignments.append(mix.last_assignment_)
    assert not torch.equal(*assignments)


# --- defaults and registry -------------------------------------------------------------------


def test_bim_default_steps_follow_kurakin():
    assert [kurakin_steps(k / 255) for k in (1, 2, 4, 8, 16)] == [1, 2, 5, 10, 20]
    assert kurakin_steps(0.1 / 255) == 1
    model = nn.Linear(1, 1)
    assert BIM(model).steps == 10 and BIM(model).alpha == 1 / 255
    assert BIM(model, eps=4 / 255).steps == 5 and BIM(model, steps=3).steps == 3


def test_igm_default_alpha_is_a_quarter_of_eps():
    model = nn.Linear(1, 1)
    assert math.isclose(IGM(model).alpha, 2 / 255) and IGM(model).m == 8
    assert math.isclose(IGM(model, eps=16 / 255).alpha, 4 / 255)


def test_registry():
    assert ATTACKS == {"fgsm": FGSM, "bim": BIM, "pgd": PGD, "pgd_l2": PGDL2, "igm": IGM}
    assert all(issubclass(cls, Attack) for cls in ATTACKS.values())


# --- validation ------------------------------------------------------------------------------


def _bad_batches() -> list:
    x, y = torch.full((2, 3, 4, 4), 0.5), torch.tensor([0, 1])
    above, below, nan = x.clone(), x.clone(), x.clone()
    above[0, 0, 0, 0] = 1.5
    below[1, 2, 3, 3] = -0.1
    nan[0, 1, 1, 1] = float("nan")
    return [
        pytest.param(above, y, r"^x .*\[0, 1\].*max 1\.5", id="above-1"),
        pytest.param(below, y, r"^x .*\[0, 1\].*min -0\.1", id="below-0"),
        pytest.param(nan, y, r"^x .*\[0, 1\].*1 NaN", id="nan"),
        pytest.param(x[0], y, r"^x must be \(N, C, H, W\).*got shape \(3, 4, 4\)", id="3-D"),
        pytest.param(x[:0], y[:0], r"^x must be \(N, C, H, W\) with N >= 1", id="empty"),
        pytest.param((x * 255).to(torch.uint8), y, r"^x .*floating.*torch\.uint8", id="uint8"),
        pytest.param(x.long(), y, r"^x .*floating.*torch\.int64", id="int64"),
        pytest.param(x, y.int(), r"^y must be a torch\.long .*torch\.int32", id="y-int32"),
        pytest.param(x, y[:1], r"^y must be .*shape \(2,\); got .*\(1,\)", id="y-shape"),
    ]


@pytest.mark.parametrize(("x", "y", "match"), _bad_batches())
@pytest.mark.parametrize("name", [*ATTACKS, "mix"])
def test_bad_batches_raise_value_error_naming_the_argument(name, x, y, match):
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    with pytest.raises(ValueError, match=match):
        _build(name, model)(x, y)


def test_success_mask_names_x_adv():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    with pytest.raises(ValueError, match=r"^x_adv must have every value in \[0, 1\]"):
        success_mask(model, torch.full((2, 3, 4, 4), 2.0), torch.tensor([0, 1]))


@pytest.mark.parametrize("eps", [0, -8 / 255, float("nan"), float("inf"), "8/255", True])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_bad_eps_raises_value_error_naming_eps(name, eps):
    with pytest.raises(ValueError, match=r"^eps must be a finite number > 0; got"):
        ATTACKS[name](nn.Linear(1, 1), eps=eps)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (PGD, {"alpha": 0.0}, "^alpha must"),
        (PGDL2, {"alpha": -0.1}, "^alpha must"),
        (BIM, {"alpha": float("inf")}, "^alpha must"),
        (PGD, {"steps": 0}, r"^steps must be an int >= 1; got 0"),
        (BIM, {"steps": 2.0}, r"^steps must be an int >= 1; got 2\.0"),
        (IGM, {"m": 0}, r"^m must be an int >= 1; got 0"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_them(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(nn.Linear(1, 1), **kwargs)


def test_bad_constructor_arguments():
    model = nn.Linear(1, 1)
    with pytest.raises(TypeError, match="^model must be a torch.nn.Module"):
        FGSM(lambda x: x)
    with pytest.raises(TypeError, match="^generator must be a torch.Generator"):
        PGD(model, generator=0)
    with pytest.raises(ValueError, match="^attacks must hold at least one Attack"):
        Mix([])
    with pytest.raises(TypeError, match=r"^attacks\[1\] must be an Attack"):
        Mix([FGSM(model), model])


# --- devices ---------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_images_with_cpu_labels_and_cpu_generator(trained, batch):
    model = copy.deepcopy(trained[0]).cuda()
    x, y = batch
    for name in [*ATTACKS, "mix"]:
        x_adv = _build(name, model)(x.cuda(), y)
        assert x_adv.device == x.cuda().device
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert success_mask(model, x_adv, y).device == x_adv.device
