import gzip
import shutil

import pytest
import torch

from vae_rt.data import DataError, load_mnist


def test_loads_the_real_files_as_whole_uint8_tensors(mnist_dir):
    train, test = load_mnist(mnist_dir)
    assert train.shape == (60000, 28, 28) and test.shape == (10000, 28, 28)
    assert train.dtype == test.dtype == torch.uint8
    assert train.float().mean().item() == pytest.approx(33.318, abs=1e-3)  # the published mean pixel


def test_environment_variable_names_the_folder(mnist_dir, monkeypatch):
    monkeypatch.setenv("VAE_RT_MNIST_DIR", str(mnist_dir))
    assert load_mnist()[1].shape == (10000, 28, 28)


def _copy(mnist_dir, tmp_path):
    folder = tmp_path / "mnist"
    shutil.copytree(mnist_dir, folder)
    return folder


def test_a_failed_download_is_one_line_with_the_cause_and_the_way_out(tmp_path, monkeypatch):
    class OfflineMNIST:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(
                "Error downloading train-images-idx3-ubyte.gz:\nTried https://example.org/mnist/, got:\n"
                "<urlopen error [Errno -2] Name or service not known>\n"
            )

    monkeypatch.setattr("torchvision.datasets.MNIST", OfflineMNIST)
    monkeypatch.setenv("VAE_RT_CACHE_DIR", str(tmp_path))  # nothing cached and no folder named: load_mnist must download
    monkeypatch.delenv("VAE_RT_MNIST_DIR")
    with pytest.raises(DataError) as caught:
        load_mnist()
    message = str(caught.value)
    assert "\n" not in message and "Name or service not known" in message and "--data-dir" in message


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "nowhere")


def test_incomplete_folder(mnist_dir, tmp_path):
    folder = _copy(mnist_dir, tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="has no t10k-labels-idx1-ubyte.gz"):
        load_mnist(folder)


@pytest.mark.parametrize("damage", ["bad magic", "truncated"])
def test_corrupt_idx_file(mnist_dir, tmp_path, damage):
    folder = _copy(mnist_dir, tmp_path)
    target = folder / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(target.read_bytes()))
    if damage == "bad magic":
        raw[0:4] = b"\x00\x00\x08\x01"
    else:
        raw = raw[: len(raw) // 2]
    target.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="corrupt or incomplete") as info:
        load_mnist(folder)
    assert "\n" not in str(info.value)
