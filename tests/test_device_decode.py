"""Device decoding (JPEG bytes decoded in batches by torchvision, resized as tensors): run on the CPU here."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from skproduct import ImageEmbedder
from skproduct.backbones import Preprocessing
from skproduct.exceptions import ImageDecodeError
from skproduct.image_pipeline import device_decode
from skproduct.image_pipeline.device_decode import jpeg_layout, run_device_decoded

TINY = dict(pretrained=False, image_size=48, batch_size=8, precision="fp32")
#: Smallest cosine similarity between a device-decoded picture's vector and the PIL path's (random weights; the
#: resizing differs slightly, and large JPEGs are decoded at full size instead of PIL's reduced-scale draft).
COSINE_VS_PIL = 0.999
CPU = torch.device("cpu")
PRE = Preprocessing(32, 36, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _encoded(image: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def _photo(seed: int, size=(60, 45)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (5, 4, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.BILINEAR)


def _cosine(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


class _Mean(torch.nn.Module):
    """A 'backbone' whose outputs are easy to reason about: per-channel means and spreads."""

    def forward(self, x):
        x = x.float()
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def _run(refs, module=None, batch_size=4, on_error="skip", **kw):
    batches = list(run_device_decoded(module or _Mean(), refs, PRE, batch_size=batch_size, num_workers=0,
                                      device=CPU, precision="fp32", on_error=on_error, **kw))
    positions = np.concatenate([b[0] for b in batches])
    assert positions.tolist() == list(range(len(refs)))
    return (np.concatenate([b[1] for b in batches]), np.concatenate([b[2] for b in batches]),
            np.concatenate([b[3] for b in batches]))


@pytest.fixture(scope="module")
def fashion_pictures(fashion_bson, tmp_path_factory):
    from skproduct.io import read_bson

    table = read_bson(fashion_bson, index_path=tmp_path_factory.mktemp("idx") / "fashion.skpidx")
    return table.sample(n=32, random_state=1)


def test_the_jpeg_header_says_what_the_device_decodes():
    photo = _photo(0)
    assert jpeg_layout(_encoded(photo)) == "baseline"
    assert jpeg_layout(_encoded(photo.convert("L"))) == "baseline"
    assert jpeg_layout(_encoded(photo, progressive=True)) == "progressive"
    assert jpeg_layout(_encoded(photo.convert("CMYK"))) == "cmyk"
    assert jpeg_layout(_encoded(photo, "PNG")) == "not-jpeg"
    assert jpeg_layout(b"\xff\xd8\xff\xe0\x00") == "other"


def test_device_vectors_match_the_pil_path(fashion_pictures, shopee_sample):
    shopee = sorted(str(p) for p in (shopee_sample / "images").rglob("*.jpg"))[:6]  # 640-1024 px photos
    for pictures in (fashion_pictures, shopee):
        pil = ImageEmbedder("timm:test_resnet", **TINY).fit_transform(pictures)
        device = ImageEmbedder("timm:test_resnet", decode="device", **TINY).fit_transform(pictures)
        assert _cosine(device, pil).min() >= COSINE_VS_PIL


def test_device_decoding_has_its_own_fingerprint():
    pil = ImageEmbedder("timm:test_resnet", **TINY).fit()
    device = ImageEmbedder("timm:test_resnet", decode="device", **TINY).fit()
    auto = ImageEmbedder("timm:test_resnet", decode="auto", **TINY).fit()  # the PIL path on a CPU
    assert device.decode_ == "device" and auto.decode_ == "cpu"
    assert device.fingerprint_ != pil.fingerprint_ == auto.fingerprint_


def test_pictures_the_device_does_not_take_fall_back_per_picture():
    photo = _photo(1)
    refs = [
        _encoded(photo),                                    # device
        _encoded(photo, "PNG"),                             # CPU: not a JPEG
        _encoded(photo.convert("CMYK")),                    # CPU: CMYK
        _encoded(photo, progressive=True),                  # CPU: progressive
        b"\xff\xd8\xff\xe0 not really a picture",           # undecodable: the policy
        photo,                                              # a PIL image
        np.asarray(photo),                                  # a uint8 array
        _encoded(_photo(2, (33, 70))),                      # device, another size in the same batch
    ]
    out, used, decoded = _run(refs, batch_size=8)
    assert used.tolist() == [True, True, True, True, False, True, True, True]
    assert decoded.tolist() == used.tolist()
    assert not out[4].any()  # skipped: zeros, and not other pictures' numbers
    for k in (1, 3, 5, 6):  # lossless or same-quality copies of the same photo give the same numbers
        np.testing.assert_allclose(out[k][:3], out[0][:3], atol=0.05)
    alone = np.concatenate([_run([r], batch_size=1)[0] for r in refs])  # per picture, never per batch
    np.testing.assert_allclose(out, alone, rtol=1e-5, atol=1e-5)
    blank, used_blank, decoded_blank = _run(refs[3:6], on_error="blank")
    assert used_blank.tolist() == [True, True, True] and decoded_blank.tolist() == [True, False, True]
    with pytest.raises(ImageDecodeError, match="image"):
        _run(refs, on_error="raise")


def test_a_batch_the_decoder_rejects_is_decoded_picture_by_picture(monkeypatch):
    import torchvision.io

    refs = [_encoded(_photo(k)) for k in range(5)]
    expected = _run(refs)[0]
    real = torchvision.io.decode_jpeg

    def no_lists(data, *args, **kwargs):
        if isinstance(data, list):
            raise RuntimeError("batched decoding failed")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", no_lists)
    np.testing.assert_allclose(_run(refs)[0], expected, rtol=1e-6)


def test_a_batch_that_runs_out_of_device_memory_is_split(caplog):
    class Small(_Mean):
        def forward(self, x):
            if len(x) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().forward(x)

    refs = [_encoded(_photo(k)) for k in range(7)]
    expected = _run(refs, batch_size=7)[0]
    with caplog.at_level(logging.WARNING, logger=device_decode.__name__):
        np.testing.assert_allclose(_run(refs, module=Small(), batch_size=7)[0], expected, rtol=1e-6)
    assert "ran out of memory" in caplog.text

    class Never(_Mean):
        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(torch.OutOfMemoryError):  # a single picture that does not fit is an error, not a loop
        _run(refs[:3], module=Never())


def test_bf16_input_is_channels_last_bf16():
    seen = []

    class Probe(_Mean):
        def forward(self, x):
            seen.append((x.dtype, x.is_contiguous(memory_format=torch.channels_last)))
            return super().forward(x)

    list(run_device_decoded(Probe(), [_encoded(_photo(0))] * 3, PRE, batch_size=4, num_workers=0, device=CPU,
                            precision="bf16", on_error="raise"))
    assert seen == [(torch.bfloat16, True)]


def test_workers_read_bytes_and_keep_the_order(fashion_pictures):
    alone = ImageEmbedder("timm:test_resnet", decode="device", **TINY).fit_transform(fashion_pictures)
    workers = ImageEmbedder("timm:test_resnet", decode="device", num_workers=2, **TINY).fit_transform(
        fashion_pictures)
    np.testing.assert_allclose(workers, alone, rtol=1e-5, atol=1e-6)


def test_a_head_on_device_decoded_vectors_scores_as_on_pil_vectors(real_weights, fashion_bson, tmp_path):
    """Real ImageNet weights on real catalogue photos: the resizing difference does not move a head.

    (``benchmarks/bench_precision.py`` measures the effect on 1,500 pictures; this is its quick check.)
    """
    from sklearn.linear_model import LogisticRegression

    from skproduct.io import read_bson

    table = read_bson(fashion_bson, index_path=tmp_path / "fashion.skpidx").sample(n=1000, random_state=0)
    top = table["category_id"].value_counts().index[:8]  # the 8 largest classes: a clear task for 160 pictures
    table = table[table["category_id"].isin(top)].groupby("category_id").head(20)
    y = table["category_id"].to_numpy()
    train = np.arange(len(y)) % 2 == 0
    common = dict(weights=real_weights, image_size=64, batch_size=40, precision="bf16")
    pil = ImageEmbedder("timm:tf_efficientnet_lite0", **common).fit_transform(table)
    device = ImageEmbedder("timm:tf_efficientnet_lite0", decode="device", **common).fit_transform(table)
    assert _cosine(device, pil).mean() > 0.99
    head = LogisticRegression(max_iter=300)
    predicted_pil = head.fit(pil[train], y[train]).predict(pil[~train])
    predicted_device = head.fit(device[train], y[train]).predict(device[~train])
    accuracy_pil, accuracy_device = (predicted_pil == y[~train]).mean(), (predicted_device == y[~train]).mean()
    assert accuracy_pil > 0.6  # the weights are real: far above the 1/8 of chance
    assert abs(accuracy_device - accuracy_pil) <= 0.075  # 6 of the 80 test pictures
    assert (predicted_device == predicted_pil).mean() >= 0.85
