"""The OOD variant sweep on a tiny model and synthetic images (no shared data needed)."""

import pytest
import torch
from conftest import TinyCNN, make_images

import covguard as cg
from covguard.bench.ood import FORMS, HEADLINE, OWN_FIT_VARIANTS, VARIANTS, OODConfig, _variant_sweep, _variants_markdown
from covguard.bench.common import split_train
from covguard.data.images import ImageSet
from covguard.detectors.multi import fit_detectors
from covguard.metrics import evaluate


def as_uint8(x):
    return (x * 255).round().to(torch.uint8)


def rgb_images(n, seed, shift=0.0):
    """make_images in three channels (the benchmark's ImageSet is RGB), (n, 3, 8, 8)."""
    x, y = make_images(n, seed=seed, shift=shift)
    return x * torch.tensor([1.0, 0.8, 0.6])[:, None, None], y


@pytest.fixture(scope="module")
def rgb_model():
    torch.manual_seed(0)
    model = TinyCNN(in_channels=3)
    x, y = rgb_images(300, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def sweep(rgb_model):
    x, y = rgb_images(300, seed=1)
    train = ImageSet(images=as_uint8(x), labels=y, classes=("a", "b", "c"), name="blobs")
    cfg = OODConfig(n_holdout=80, n_criterion=40, batch_size=64, progress=False)
    fit, hold = split_train(train, n_holdout=cfg.n_holdout, max_train=None, seed=cfg.seed, batch_size=cfg.batch_size)
    common = {"layers": ["block1", "block2"], "keep_moments": True, "covariance": "full", "fit_positions": 1.0}
    detectors = {"simple_mahalanobis": cg.SimpleMahalanobis(rgb_model, **common), HEADLINE: cg.ClassMahalanobis(rgb_model, **common)}
    own = {name: detectors[base].clone(keep_moments=False, **changes) for name, (base, changes) in OWN_FIT_VARIANTS.items()}
    fit_detectors([*detectors.values(), *own.values()], fit, holdout=hold, progress=False)
    x_id = as_uint8(rgb_images(60, seed=2)[0]).float() / 255
    ood = {"shifted": as_uint8((rgb_images(60, seed=3)[0] + 0.3).clamp(0, 1)), "noise": as_uint8(torch.rand(60, 3, 8, 8))}
    sets = {"id": (as_uint8(x_id), None), "ood": ood}
    id_scores = {name: (det.score(x_id), {}) for name, det in detectors.items()}
    metrics = {s: {name: {"auroc": evaluate(id_scores[name][0], det.score(imgs.float() / 255)).auroc} for name, det in detectors.items()}
               for s, imgs in ood.items()}
    return _variant_sweep(detectors, own, train, sets, x_id, id_scores, metrics, cfg), metrics


def test_sweep_covers_every_variant_and_selects_by_likelihood(sweep):
    out, metrics = sweep
    assert set(out) == set(VARIANTS) | set(OWN_FIT_VARIANTS)
    assert out["class-top1/full/mean"]["auroc"] == {s: metrics[s][HEADLINE]["auroc"] for s in metrics}
    for name, v in out.items():
        assert set(v["auroc"]) == {"shifted", "noise"}, name
        assert (v["holdout_log_likelihood"] is None) == name.endswith("/relative"), name
    for kind in ("simple", "class-top1"):
        candidates = {f"{kind}/{form}/mean": out[f"{kind}/{form}/mean"] for form in FORMS}
        assert [n for n, v in candidates.items() if v.get("selected")] == [max(candidates, key=lambda n: candidates[n]["holdout_log_likelihood"])]
    assert out["simple/full/mean/normalized"]["auroc"]["noise"] > 0.5


def test_sweep_renders_with_relative_variants(sweep):
    out, _ = sweep
    lines = _variants_markdown({"m": {"variants": {k: {**v, "auroc": {**v["auroc"], **{s: 0.5 for s in ("cifar100", "tin", "mnist", "mnist_jpeg", "uniform_noise", "gaussian_noise")}}} for k, v in out.items()}}})
    table = "\n".join(lines)
    assert "| class-top1/full/mean/relative |" in table and "| simple/full/mean/fusion-gaussian |" in table
