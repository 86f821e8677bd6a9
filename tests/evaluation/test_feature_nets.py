"""feature_nets.py: choosing a feature network, the run's cached domain classifier, metric labels."""

import json

import pytest

from ldmkit.data import load_dataset
from ldmkit.evaluation import feature_nets
from ldmkit.evaluation.features import FeatureNetworkError


def test_domain_feature_net_is_cached_in_the_run_and_reused(shapes, tmp_path, monkeypatch):
    net = feature_nets.get_feature_net("domain", dataset=shapes, run_dir=tmp_path, epochs=1)
    folder = tmp_path / "eval" / "domain-classifier"
    assert (folder / "model.safetensors").is_file() and net.name == "shapes-cnn"
    assert (
        json.loads((folder / "config.json").read_text())["data_fingerprint"] == shapes.fingerprint()
    )
    assert feature_nets.metric_labels(net) == {"FID": "FID-shapes-cnn", "KID": "KID-shapes-cnn",
                                     "IS": "IS-shapes-cnn"}  # fmt: skip

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cached classifier fits the data")

    monkeypatch.setattr(feature_nets, "train_domain_classifier", no_training)
    again = feature_nets.get_feature_net("domain", dataset=shapes, run_dir=tmp_path)
    assert again.fingerprint == net.fingerprint
    other = load_dataset("builtin:shapes?n=32", image_size=16, seed=3)
    with pytest.raises(AssertionError, match="retrained"):  # other data: must retrain
        feature_nets.get_feature_net("domain", dataset=other, run_dir=tmp_path)


def test_small_data_gets_enough_domain_classifier_steps(shapes, monkeypatch):
    seen = {}

    def fake_train(images, labels, *, epochs, **kwargs):
        seen["epochs"] = epochs
        raise RuntimeError("stop here")

    monkeypatch.setattr(feature_nets, "train_domain_classifier", fake_train)
    with pytest.raises(RuntimeError, match="stop here"):
        feature_nets.get_feature_net("domain", dataset=shapes, epochs=1)
    assert seen["epochs"] == feature_nets.DOMAIN_MIN_STEPS  # 96 images: one batch per epoch


def test_feature_net_kinds_and_errors(shapes, hide_inception):
    assert feature_nets.default_feature_kind(16) == "domain"
    with pytest.raises(ValueError, match="unknown feature network 'vgg'"):
        feature_nets.get_feature_net("vgg", dataset=shapes)
    with pytest.raises(ValueError, match="pass dataset="):
        feature_nets.get_feature_net("domain")
    assert feature_nets.default_feature_kind(256) == "domain"
    with pytest.raises(FeatureNetworkError, match="pip install"):
        feature_nets.get_feature_net("inception")


def test_metric_name_separates_inception_from_domain_features():
    assert feature_nets.metric_name("FID", "inception-v3-pool3") == "FID"
    assert feature_nets.metric_name("FID", "shapes-cnn") == "FID-shapes-cnn"


def test_a_weak_cached_classifier_from_before_the_target_is_retrained(
    shapes, tmp_path, monkeypatch
):
    net = feature_nets.get_feature_net("domain", dataset=shapes, run_dir=tmp_path, epochs=1)
    training = tmp_path / "eval" / "domain-classifier" / "training.json"
    record = json.loads(training.read_text())
    assert record["target_accuracy"] == feature_nets.DOMAIN_TARGET_ACCURACY

    def fake_train(*args, **kwargs):
        raise RuntimeError("retrained")

    monkeypatch.setattr(feature_nets, "train_domain_classifier", fake_train)
    # a weak classifier cached before the target existed (no target in its record), or trained
    # towards a lower one: retrained
    record["held_out_accuracy"] = 0.35
    for target in (None, feature_nets.DOMAIN_TARGET_ACCURACY - 0.05):
        record["target_accuracy"] = target
        training.write_text(json.dumps(record))
        with pytest.raises(RuntimeError, match="retrained"):
            feature_nets.get_feature_net("domain", dataset=shapes, run_dir=tmp_path)
    # the same accuracy after training on to the target: the best there is, reused
    record["target_accuracy"] = feature_nets.DOMAIN_TARGET_ACCURACY
    training.write_text(json.dumps(record))
    again = feature_nets.get_feature_net("domain", dataset=shapes, run_dir=tmp_path)
    assert again.fingerprint == net.fingerprint
