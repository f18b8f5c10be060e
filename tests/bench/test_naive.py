"""The fast conv scoring path against an oracle written here, and the benchmark's naive scorer against both."""

import pytest
import torch
import torch.nn.functional as F

from covguard.bench.naive import NaiveReference, max_relative_error
from covguard.bench.timing_speed import DetectorSpec
from covguard.detectors import ClassMahalanobis
from covguard.models import resnet20

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return resnet20(num_classes=4).eval()


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(48, 3, 16, 16, generator=gen)  # maps 16x16, 8x8, 4x4: every layer, small
    y = torch.arange(48) % 4
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 32, 16)], [x[32:]], torch.rand(6, 3, 16, 16, generator=gen)


def oracle_patch_distances(det, x):
    """{layer: (N, L)} squared distances of every patch, float64: unfold, dense precision, class weights."""
    with torch.no_grad():
        logits, feats = det.forward(x)
    weights = None  # (N, K): which class statistics score each image
    if isinstance(det, ClassMahalanobis):
        probs = logits.double().softmax(1)  # (N, K)
        if det.scoring == "top1":
            weights = F.one_hot(probs.argmax(1), probs.shape[1]).double()
        else:
            top_p, top_k = probs.topk(min(det.top_m, probs.shape[1]), dim=1)  # (N, m)
            weights = torch.zeros_like(probs).scatter_(1, top_k, top_p / top_p.sum(1, keepdim=True))
    out = {}
    for layer in det.layers:
        form = det.forms_[layer]
        K, D = form.mean.shape
        P = torch.zeros(K, D, D, dtype=torch.float64)  # P = proj diag(gain) proj^T + diag(diag)
        if form.proj is not None:
            P += torch.einsum("kdr,kr,ker->kde", form.proj.double(), form.gain.double(), form.proj.double())
        if form.diag is not None:
            P += torch.diag_embed(form.diag.double())
        k, pad = det.gaussians[layer].kernel_size, det.gaussians[layer].padding
        p = F.unfold(feats[layer].double(), k, padding=pad).transpose(1, 2)  # (N, L, D)
        dev = p[:, :, None, :] - form.mean.double()  # (N, L, K, D)
        d2 = torch.einsum("nlkd,kde,nlke->nlk", dev, P, dev)  # (N, L, K)
        out[layer] = d2[..., 0] if weights is None else (d2 * weights[:, None, :]).sum(-1)  # (N, L)
    return out


SPECS = [
    DetectorSpec(kind, scoring, form, rank)
    for kind, scoring in [("simple", "-"), ("class", "top1"), ("class", "mixture")]
    for form, rank in [("full", 0), ("diag", 0), ("lowrank", 16)]
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_fast_path_matches_the_oracle_on_every_patch_in_float32(model, data, spec):
    """Accuracy guard: conv scoring (triangular full, 1x1 diagonal terms, fused norms) == (p-mu)^T P (p-mu)."""
    fit, holdout, x = data
    det = spec.build(model, ["layer1", "layer2", "layer3"]).fit(fit, holdout=holdout, progress=False)
    maps = det.distance_maps(x)
    for layer, ref in oracle_patch_distances(det, x).items():
        torch.testing.assert_close(maps[layer].flatten(1).double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_naive_scorer_agrees_with_the_oracle_and_the_detector(model, data, spec):
    fit, holdout, x = data
    det = spec.build(model, ["layer1", "layer2", "layer3"]).fit(fit, holdout=holdout, progress=False)
    naive = NaiveReference(det)
    with torch.no_grad():
        logits, feats = det.forward(x)
    ref = torch.stack([d2.mean(1) for d2 in oracle_patch_distances(det, x).values()], dim=1)  # (N, n_layers)
    torch.testing.assert_close(naive.layer_scores(logits, feats).double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert max_relative_error(det, naive, x) <= 1e-4


def test_naive_reference_scores_like_the_detector(model, data):
    fit, holdout, x = data
    det = DetectorSpec("class", "mixture", "lowrank", 8).build(model, ["layer2", "layer3"]).fit(fit, holdout=holdout, progress=False)
    torch.testing.assert_close(NaiveReference(det).score(x), det.score(x), rtol=1e-4, atol=1e-3)
