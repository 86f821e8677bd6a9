"""reference.py: reference features and their cache, scores of samples, the real-vs-real floor,
held-out specs."""

import pytest
import torch

from ldmkit.data import load_dataset
from ldmkit.data.transforms import to_float
from ldmkit.evaluation import reference
from ldmkit.evaluation.features import train_domain_classifier
from ldmkit.evaluation.metrics import MIN_FID_IMAGES

# ---------------------------------------------------------------------------------------------
# reference features and their cache


def test_reference_features_are_cached_and_reused(shapes, random_net, tmp_path, monkeypatch):
    ref = reference.reference_features(shapes, random_net, n=40, cache_dir=tmp_path)
    assert not ref.from_cache and ref.n == 40 and ref.path.is_file()
    assert ref.path.name == f"ref-{shapes.fingerprint()}-{random_net.fingerprint}-n40.safetensors"
    assert torch.allclose(ref.stats.mean, ref.features.mean(0))
    assert torch.equal(ref.labels, shapes.labels[ref.indices])
    mtime = ref.path.stat().st_mtime_ns

    def no_recompute(*args, **kwargs):
        raise AssertionError("reference features were recomputed instead of read from the cache")

    monkeypatch.setattr(reference, "compute_features", no_recompute)
    again = reference.reference_features(shapes, random_net, n=40, cache_dir=tmp_path)
    assert again.from_cache and ref.path.stat().st_mtime_ns == mtime
    assert torch.equal(again.features, ref.features)
    assert torch.allclose(again.stats.cov, ref.stats.cov)
    # a smaller n is the same permutation's prefix, so the n=40 file serves it
    fewer = reference.reference_features(shapes, random_net, n=10, cache_dir=tmp_path)
    assert fewer.from_cache and torch.equal(fewer.features, ref.features[:10])
    assert sorted(p.name for p in tmp_path.iterdir()) == [ref.path.name]


def test_reference_features_of_other_data_or_network_are_not_reused(shapes, random_net, tmp_path):
    reference.reference_features(shapes, random_net, n=20, cache_dir=tmp_path)
    other = load_dataset("builtin:shapes?n=96", image_size=16, seed=5)
    assert not reference.reference_features(other, random_net, n=20, cache_dir=tmp_path).from_cache
    net2, _ = train_domain_classifier(shapes.images, None, seed=1)
    ref2 = reference.reference_features(shapes, net2, n=20, cache_dir=tmp_path)
    assert not ref2.from_cache
    with pytest.raises(ValueError, match="reference features were made by"):
        reference.evaluate_samples(shapes.images[:8], ref2, random_net)


def test_reference_features_reject_tiny_n(shapes, random_net):
    with pytest.raises(ValueError, match="n must be >= 2"):
        reference.reference_features(shapes, random_net, n=1, cache_dir=None)


# ---------------------------------------------------------------------------------------------
# scores of samples and the floor


def test_evaluate_samples_states_n_network_and_bias(shapes, random_net):
    ref = reference.reference_features(shapes, random_net, n=64, cache_dir=None)
    real_copy = to_float(shapes.images[ref.indices[:16]])  # the first 16 refs
    m = reference.evaluate_samples(real_copy, ref, random_net)
    assert m["n"] == m["n_ref"] == 16
    assert m["FID"] == pytest.approx(0, abs=1e-6)  # same images as the matched reference
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["feature_network"] == random_net.name == "domain-cnn-random"
    assert m["feature_fingerprint"] == random_net.fingerprint
    assert m["labels"]["FID"] == "FID-domain-cnn-random"
    assert "IS" not in m  # no labels, no logits
    assert "biased" in m["warning"] and 16 < MIN_FID_IMAGES
    noise = torch.rand(16, 3, 16, 16) * 2 - 1
    assert reference.evaluate_samples(noise, ref, random_net)["FID"] > 1.0


def test_inception_score_comes_from_a_labelled_domain_classifier(shapes):
    net, _ = train_domain_classifier(shapes.images[:48], shapes.labels[:48], epochs=1, seed=0)
    ref = reference.reference_features(shapes, net, n=32, cache_dir=None)
    m = reference.evaluate_samples(shapes.images[:16], ref, net)
    assert m["labels"]["IS"] == f"IS-{net.name}" and 1.0 <= m["IS"] <= len(shapes.class_names)


def test_real_vs_real_floor_uses_disjoint_halves_of_the_same_n(shapes, random_net):
    ref = reference.reference_features(shapes, random_net, n=40, cache_dir=None)
    floor = reference.real_vs_real_floor(ref, 20)
    assert floor["n"] == 20 and floor["note"] is None
    direct = reference._metrics(ref.features[:20], ref.features[20:40], None, 0)
    assert floor["FID"] == pytest.approx(direct["FID"]) and floor["FID"] > 0
    short = reference.real_vs_real_floor(ref, 30)  # 40 images cannot give 2 x 30
    assert short["n"] == 20 and "2 x 20" in short["note"]


# ---------------------------------------------------------------------------------------------
# held-out data


def test_held_out_spec():
    assert reference.held_out_spec("builtin:shapes?n=512") == ("builtin:shapes?n=512", 1)
    assert reference.held_out_spec("builtin:mnist") == ("builtin:mnist?split=test", 0)
    assert reference.held_out_spec("cifar10:/d/c10") == ("cifar10:/d/c10?split=test", 0)
    assert reference.held_out_spec("mnist:/d/m?split=test") is None
    assert reference.held_out_spec("builtin:digits") is None
    assert reference.held_out_spec("/some/folder") is None
