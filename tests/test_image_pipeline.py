"""The image pipeline shared by the image estimators: streaming pooling and the device and precision policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from skproduct.exceptions import DeviceFallbackWarning, DeviceUnavailableError, EmptyProductWarning
from skproduct.image_pipeline import flatten_products, pool_products
from skproduct.image_pipeline.device import precision_for_call, resolve_device, resolve_precision


def _direct(outputs, used, owner, n_products, how, fallback):
    out = np.full((n_products, outputs.shape[1]), fallback, dtype=float)
    for product in range(n_products):
        rows = outputs[(owner == product) & used]
        if len(rows):
            out[product] = rows.mean(axis=0) if how == "mean" else rows.max(axis=0)
    return out


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=30),
    batch=st.integers(1, 9),
    chunk=st.integers(1, 7),
    how=st.sampled_from(["mean", "max"]),
    seed=st.integers(0, 2**16),
)
def test_streaming_pooling_equals_pooling_everything_at_once(sizes, batch, chunk, how, seed):
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(len(sizes)), sizes)
    outputs = rng.normal(size=(len(owner), 3))
    used = rng.random(len(owner)) > 0.2
    batches = [(np.arange(s, min(s + batch, len(owner))), outputs[s : s + batch], used[s : s + batch])
               for s in range(0, len(owner), batch)]
    with pytest.warns(EmptyProductWarning) if (np.bincount(owner[used], minlength=len(sizes)) == 0).any() else \
            _no_warning():
        chunks = list(pool_products(batches, owner, how=how, fallback=-7.0, chunk_size=chunk))
    assert [start for start, _ in chunks] == list(range(0, len(sizes), chunk))  # every chunk, in order
    assert max(len(rows) for _, rows in chunks) <= chunk  # memory holds one chunk
    np.testing.assert_allclose(np.concatenate([rows for _, rows in chunks]),
                               _direct(outputs, used, owner, len(sizes), how, -7.0))


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", EmptyProductWarning)

    def __exit__(self, *exc):
        return self._catch.__exit__(*exc)


def test_flatten_keeps_product_order():
    refs, owner = flatten_products([["a"], ["b", "c"], ["d"]])
    assert refs == ["a", "b", "c", "d"] and owner.tolist() == [0, 1, 1, 2]


def test_an_explicit_missing_device_is_an_error_an_inherited_one_falls_back():
    with pytest.raises(DeviceUnavailableError, match="cuda:7"):
        resolve_device("cuda:7")
    with pytest.raises(DeviceUnavailableError, match="is not a torch device"):
        resolve_device("gpu")
    with pytest.warns(DeviceFallbackWarning, match="cuda:7"):
        assert resolve_device("cuda:7", inherited=True) == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")


def test_one_precision_policy():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"  # CPUs run bf16 autocast
    with pytest.raises(DeviceUnavailableError, match="fp16"):
        resolve_precision("fp16", cpu)
    assert precision_for_call("bf16", cpu) == "bf16"  # kept: the numbers (and cache keys) stay the fit's
    with pytest.warns(DeviceFallbackWarning, match="fp16"):
        assert precision_for_call("fp16", cpu) == "fp32"



def test_loaders_with_workers_install_no_sigchld_handler(monkeypatch, fashion_bson, tmp_path):
    """torch's DataLoader installs a process-wide SIGCHLD handler; skproduct's loaders run without it.

    With it installed and OpenVINO models in the process, the interpreter crashed (during the loader, or in a later
    ``subprocess.run``): see skproduct/image_pipeline/worker_signals.py.
    """
    import signal

    from torch.utils.data._utils import signal_handling

    from skproduct import ImageEmbedder
    from skproduct.io import read_bson

    table = read_bson(fashion_bson, index_path=tmp_path / "f.skpidx").head(6)
    tiny = dict(pretrained=False, image_size=32, batch_size=2, num_workers=1, precision="fp32")
    expected = ImageEmbedder("timm:test_resnet", **{**tiny, "num_workers": 0}).fit_transform(table)
    monkeypatch.setattr(signal_handling, "_SIGCHLD_handler_set", False)
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for decode in ("cpu", "device"):
            vectors = ImageEmbedder("timm:test_resnet", decode=decode, **tiny).fit_transform(table)
            assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL and not signal_handling._SIGCHLD_handler_set
            if decode == "cpu":
                np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)

        def users_handler(signum, frame):
            pass

        signal.signal(signal.SIGCHLD, users_handler)  # one installed before, by a loader of the user's
        signal_handling._SIGCHLD_handler_set = True
        ImageEmbedder("timm:test_resnet", **tiny).fit_transform(table)
        assert signal.getsignal(signal.SIGCHLD) is users_handler and signal_handling._SIGCHLD_handler_set
    finally:
        signal.signal(signal.SIGCHLD, previous if previous is not None else signal.SIG_DFL)
