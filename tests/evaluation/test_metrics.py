"""Metrics against closed forms, scipy and torchmetrics (the `reference` tests)."""

import logging

import numpy as np
import pytest
import torch

from ldmkit.evaluation.metrics import (
    FeatureStats,
    fid_bias_warning,
    fid_from_features,
    fid_from_stats,
    frechet_distance,
    inception_score,
    kid,
    memorisation_report,
    mmd2_unbiased,
    nearest_neighbours,
    precision_recall,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _random_spd(d, g):
    a = torch.randn(d, 2 * d, generator=g, dtype=torch.float64)
    return a @ a.T / (2 * d) + 0.05 * torch.eye(d, dtype=torch.float64)


class _Identity(torch.nn.Module):
    """A 'feature network' for torchmetrics that returns its input: the features we choose."""

    def __init__(self, d):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x


# ---------------------------------------------------------------------------------------------
# FID


def test_frechet_distance_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = _gen()
    for d in (1, 4, 16):
        mu1, mu2 = torch.randn(d, generator=g).double(), torch.randn(d, generator=g).double()
        c1, c2 = _random_spd(d, g), _random_spd(d, g)
        covmean = scipy_linalg.sqrtm(c1.numpy() @ c2.numpy()).real
        expected = (
            float(((mu1 - mu2) ** 2).sum())
            + float(c1.trace() + c2.trace())
            - 2 * float(np.trace(covmean))
        )
        assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9, abs=1e-10)


def test_frechet_distance_diagonal_closed_form():
    # For diagonal covariances (C1 C2)^(1/2) = diag(sqrt(a b)), so the trace term is
    # sum (sqrt(a) - sqrt(b))^2.
    mu1 = torch.tensor([0.0, 1.0, -2.0])
    mu2 = torch.tensor([1.0, 1.0, 0.5])
    a = torch.tensor([1.0, 4.0, 0.25])
    b = torch.tensor([9.0, 1.0, 0.25])
    expected = (1 + 0 + 6.25) + ((1 - 3) ** 2 + (2 - 1) ** 2 + 0)
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(
        expected, rel=1e-12
    )


def test_fid_of_sampled_gaussians_approaches_closed_form():
    g = _gen(1)
    n, d = 20000, 4
    a, b = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([2.0, 0.5, 0.5, 3.0])
    mu2 = torch.tensor([0.5, 0.0, -0.5, 0.0])
    f1 = torch.randn(n, d, generator=g, dtype=torch.float64) * a.sqrt()
    f2 = torch.randn(n, d, generator=g, dtype=torch.float64) * b.sqrt() + mu2
    expected = float((mu2**2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert fid_from_features(f1, f2) == pytest.approx(expected, rel=0.05)


def test_fid_of_a_set_with_itself_is_zero():
    g = _gen(2)
    f = torch.randn(300, 32, generator=g, dtype=torch.float64) * 3 + 1
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)
    # rank-deficient covariance (N < D) stays finite and ~0 too
    few = f[:10]
    assert fid_from_features(few, few) == pytest.approx(0.0, abs=1e-7)
    assert fid_from_features(few, f[10:20]) > 1.0


def test_fid_is_symmetric_and_positive_for_a_shift():
    g = _gen(3)
    f1 = torch.randn(200, 8, generator=g, dtype=torch.float64)
    f2 = torch.randn(200, 8, generator=g, dtype=torch.float64) + 1.0
    d12, d21 = fid_from_features(f1, f2), fid_from_features(f2, f1)
    assert d12 == pytest.approx(d21, rel=1e-10)
    assert 6.0 < d12 < 10.0  # ||shift||^2 = 8 plus sampling noise


@pytest.mark.reference
def test_fid_matches_torchmetrics():
    fid_mod = pytest.importorskip("torchmetrics.image.fid")
    g = _gen(4)
    d = 16
    real = torch.randn(150, d, generator=g, dtype=torch.float64)
    fake = torch.randn(170, d, generator=g, dtype=torch.float64) @ _random_spd(d, g) + 0.2
    metric = fid_mod.FrechetInceptionDistance(feature=_Identity(d))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected = float(metric.compute())
    assert fid_from_features(real, fake) == pytest.approx(expected, rel=1e-8)


def test_fid_bad_inputs():
    with pytest.raises(ValueError, match="width"):
        fid_from_features(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="NaN"):
        fid_from_features(torch.full((5, 3), float("nan")), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(2))


def test_small_n_fid_warns(caplog):
    assert "2000" in fid_bias_warning(100)
    assert fid_bias_warning(2000) is None
    f = torch.randn(50, 4, generator=_gen(5))
    with caplog.at_level(logging.WARNING, logger="ldmkit.evaluation.metrics"):
        fid_from_features(f, f + 1)
    assert "biased" in caplog.text


# ---------------------------------------------------------------------------------------------
# streaming statistics


def test_streaming_stats_match_numpy_for_any_batch_size():
    g = _gen(6)
    # a large mean with a small spread: a naive sum of x x^T would lose digits here
    x = torch.randn(257, 5, generator=g, dtype=torch.float64) * 0.5 + 1000.0
    mean_np, cov_np = x.numpy().mean(0), np.cov(x.numpy(), rowvar=False, ddof=1)
    for batch in (1, 7, 64, 257):
        stats = FeatureStats()
        for s in range(0, len(x), batch):
            stats.update(x[s : s + batch])
        assert stats.n == 257
        np.testing.assert_allclose(stats.mean.numpy(), mean_np, rtol=0, atol=1e-10)
        np.testing.assert_allclose(stats.cov.numpy(), cov_np, rtol=0, atol=1e-10)


def test_stats_merge_equals_one_pass():
    g = _gen(7)
    x = torch.randn(100, 6, generator=g, dtype=torch.float64) + 3
    whole = FeatureStats().update(x)
    merged = FeatureStats().update(x[:30]).merge(FeatureStats().update(x[30:]))
    assert merged.n == 100
    np.testing.assert_allclose(merged.mean.numpy(), whole.mean.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(merged.cov.numpy(), whole.cov.numpy(), rtol=0, atol=1e-12)
    assert FeatureStats().merge(whole).n == 100  # merging into empty stats


def test_fid_from_stats_equals_fid_from_features():
    g = _gen(8)
    a = torch.randn(80, 6, generator=g, dtype=torch.float64)
    b = torch.randn(90, 6, generator=g, dtype=torch.float64) * 2
    sa = FeatureStats().update(a[:40]).update(a[40:])
    sb = FeatureStats().update(b)
    assert fid_from_stats(sa, sb) == pytest.approx(fid_from_features(a, b), rel=1e-12)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_stats_save_load_round_trip(tmp_path, suffix):
    x = torch.randn(40, 5, generator=_gen(9), dtype=torch.float64)
    meta = {"feature_network": "shapes-cnn", "fingerprint": "abc123", "n_images": "40"}
    stats = FeatureStats(meta=meta).update(x)
    path = tmp_path / f"ref{suffix}"
    stats.save(path)
    loaded = FeatureStats.load(path)
    assert loaded.n == 40 and loaded.meta == meta
    assert torch.equal(loaded.mean, stats.mean) and torch.equal(loaded.cov, stats.cov)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    if suffix == ".npz":
        np.load(path, allow_pickle=False)  # readable without pickle


def test_stats_bad_inputs(tmp_path):
    stats = FeatureStats().update(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="width 5"):
        stats.update(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="at least 2"):
        _ = FeatureStats().update(torch.zeros(1, 4)).cov
    with pytest.raises(ValueError, match="suffix"):
        stats.save(tmp_path / "ref.pt")
    with pytest.raises(ValueError, match="empty"):
        FeatureStats().save(tmp_path / "ref.npz")
    a = FeatureStats(meta={"fingerprint": "a"}).update(torch.zeros(3, 4))
    b = FeatureStats(meta={"fingerprint": "b"}).update(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="different fingerprint"):
        a.merge(b)


# ---------------------------------------------------------------------------------------------
# KID


def _mmd2_loops(x, y):
    """Unbiased MMD^2 written out with explicit sums over pairs (slow, for tiny sets)."""

    def k(a, b):
        return (float(a @ b) / len(a) + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd2_unbiased_matches_pairwise_sums_for_unequal_sizes():
    g = _gen(10)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 3, generator=g, dtype=torch.float64) + 0.5
    assert float(mmd2_unbiased(x, y)) == pytest.approx(_mmd2_loops(x, y), rel=1e-12)


@pytest.mark.reference
def test_kid_matches_torchmetrics_on_the_full_sets():
    kid_mod = pytest.importorskip("torchmetrics.image.kid")
    g = _gen(11)
    real = torch.randn(120, 10, generator=g, dtype=torch.float64)
    fake = torch.randn(120, 10, generator=g, dtype=torch.float64) * 1.3 + 0.2
    # subsets=1 with subset_size = n takes every item, so the random draw does not matter
    metric = kid_mod.KernelInceptionDistance(feature=_Identity(10), subsets=1, subset_size=120)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected_mean, _ = metric.compute()
    ours = kid(real, fake, subsets=1, subset_size=None)
    assert ours.mean == pytest.approx(float(expected_mean), rel=1e-10)
    assert ours.std == 0.0


def test_kid_of_one_distribution_is_near_zero():
    g = _gen(12)
    a = torch.randn(400, 8, generator=g, dtype=torch.float64)
    b = torch.randn(400, 8, generator=g, dtype=torch.float64)
    same = kid(a, b, subsets=20, subset_size=200, generator=_gen(0))
    shifted = kid(a, b + 0.5, subsets=20, subset_size=200, generator=_gen(0))
    assert shifted.mean > 0.05
    assert abs(same.mean) < 0.02 * shifted.mean
    # the estimator is unbiased, so it dips below zero about as often as above
    assert kid(a, a, subsets=1, subset_size=None).mean < 0


def test_kid_is_reproducible_with_a_generator_and_checks_sizes():
    g = _gen(13)
    a = torch.randn(50, 4, generator=g, dtype=torch.float64)
    b = torch.randn(60, 4, generator=g, dtype=torch.float64)
    assert kid(a, b, 5, 20, _gen(1)) == kid(a, b, 5, 20, _gen(1))
    with pytest.raises(ValueError, match="subset_size=None"):
        kid(a, b, subsets=2, subset_size=1000)
    with pytest.raises(ValueError, match="subsets"):
        kid(a, b, subsets=0, subset_size=10)


# ---------------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_of_uniform_classifier_is_one():
    result = inception_score(torch.zeros(40, 7), splits=4)
    assert result.mean == pytest.approx(1.0, abs=1e-12) and result.std == pytest.approx(0.0)


def test_inception_score_of_perfect_balanced_classifier_is_class_count():
    k, n = 5, 50
    probs = torch.nn.functional.one_hot(torch.arange(n) % k, k).double()
    assert inception_score(probs, splits=1).mean == pytest.approx(k, rel=1e-12)
    result = inception_score(probs, splits=5)  # each split of 10 holds every class twice
    assert result.mean == pytest.approx(k, rel=1e-12) and result.std == pytest.approx(0.0)
    # confident logits give nearly the same
    assert inception_score(probs * 50, splits=1, kind="logits").mean == pytest.approx(k, rel=1e-6)


@pytest.mark.reference
def test_inception_score_matches_torchmetrics():
    is_mod = pytest.importorskip("torchmetrics.image.inception")
    logits = torch.randn(64, 10, generator=_gen(14), dtype=torch.float64) * 2
    metric = is_mod.InceptionScore(feature=_Identity(10), splits=1)
    metric.update(logits)
    expected, _ = metric.compute()
    assert inception_score(logits, splits=1).mean == pytest.approx(float(expected), rel=1e-10)
    probs = logits.softmax(1)
    assert inception_score(probs, splits=1).mean == pytest.approx(float(expected), rel=1e-10)


def test_inception_score_bad_inputs():
    with pytest.raises(ValueError, match="non-negative"):
        inception_score(torch.tensor([[1.5, -0.5]]), splits=1, kind="probs")
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.zeros(3, 4), splits=4)
    with pytest.raises(ValueError, match="kind"):
        inception_score(torch.zeros(3, 4), splits=1, kind="softmax")


# ---------------------------------------------------------------------------------------------
# precision / recall, nearest neighbours, memorisation


def test_precision_recall_identical_and_disjoint_sets():
    f = torch.randn(60, 8, generator=_gen(15), dtype=torch.float64)
    assert precision_recall(f, f, k=3) == (1.0, 1.0)
    assert precision_recall(f, f + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_known_answers():
    # 1-D: reals 0..9 with k=1 have radius 1, so of the fakes {0.5, 3, 20, 100} two lie inside.
    real = torch.arange(10, dtype=torch.float64)[:, None]
    fake = torch.tensor([[0.5], [3.0], [20.0], [100.0]], dtype=torch.float64)
    assert precision_recall(real, fake, k=1).precision == 0.5
    # two far-apart clusters of reals; the fakes are exactly one of them
    g = _gen(16)
    a = torch.randn(20, 4, generator=g, dtype=torch.float64)
    b = torch.randn(30, 4, generator=g, dtype=torch.float64) + 100.0
    real = torch.cat([a, b])
    assert precision_recall(real, a, k=3) == (1.0, 20 / 50)
    # chunking does not change the answer
    assert precision_recall(real, a, k=3, chunk_size=7) == (1.0, 20 / 50)


def test_precision_recall_bad_k():
    with pytest.raises(ValueError, match="at least 6"):
        precision_recall(torch.zeros(4, 2), torch.zeros(10, 2), k=5)


def test_nearest_neighbours_matches_brute_force():
    g = _gen(17)
    q = torch.randn(23, 6, generator=g, dtype=torch.float64)
    bank = torch.randn(41, 6, generator=g, dtype=torch.float64)
    idx, dist = nearest_neighbours(q, bank, chunk_size=5)
    full = torch.cdist(q, bank, compute_mode="donot_use_mm_for_euclid_dist")
    assert torch.equal(idx, full.argmin(1))
    np.testing.assert_allclose(dist.numpy(), full.min(1).values.numpy(), rtol=0, atol=1e-10)


def test_memorisation_report_finds_the_copies():
    g = _gen(18)
    d = 16
    train = torch.randn(60, d, generator=g, dtype=torch.float64)
    held_out = torch.randn(60, d, generator=g, dtype=torch.float64)
    copied = torch.tensor([3, 17, 42, 5, 59])
    copies = train[copied] + 0.01 * torch.randn(5, d, generator=g, dtype=torch.float64)
    fresh = torch.randn(15, d, generator=g, dtype=torch.float64)
    gen = torch.cat([fresh[:7], copies, fresh[7:]])  # copies at positions 7..11
    report = memorisation_report(gen, train, held_out, worst=5)
    assert report.n == 20
    assert report.near_copy_share == pytest.approx(5 / 20)
    assert sorted(report.worst.tolist()) == [7, 8, 9, 10, 11]
    assert torch.equal(report.train_index[7:12], copied)
    assert (report.ratio[7:12] < 0.05).all()
    assert (report.ratio[:7] > 1 / 3).all() and (report.ratio[12:] > 1 / 3).all()
