import os
import warnings

import numpy as np
import pytest
import torch

from vae_rt.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from vae_rt.model import VAE, VAEConfig


def test_round_trip_keeps_weights_config_and_extras(tmp_path):
    model = VAE(VAEConfig(z_dim=5, h1_dim=64, h2_dim=32))
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, metrics=[{"epoch": 1, "test_loss": 150.0}])
    loaded, ckpt = load_checkpoint(path)
    assert loaded.config == model.config
    assert ckpt["metrics"][0]["test_loss"] == 150.0 and ckpt["format"] == "vae-rt"
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed, not left behind


def test_tutorial_state_dict_loads_with_inferred_dimensions(tmp_path):
    model = VAE(VAEConfig(z_dim=8, h1_dim=100, h2_dim=50))
    path = tmp_path / "checkpoint_8.pth"
    torch.save(model.state_dict(), path)
    loaded, _ = load_checkpoint(path)
    assert loaded.config == VAEConfig(x_dim=784, h1_dim=100, h2_dim=50, z_dim=8)
    z = torch.randn(3, 8)
    assert torch.equal(loaded.decode(z), model.decode(z))


def test_bundled_model_loads_and_beats_the_published_best(bundled):
    model, ckpt = load_checkpoint(None)
    assert model.config == VAEConfig()
    assert ckpt["metrics"][-1]["test_loss"] < 138.26  # best published test loss of this net


def test_bundled_model_scores_what_its_checkpoint_records(bundled, mnist_dir):
    from vae_rt.data import load_mnist
    from vae_rt.evaluate import test_loss, to_pixels

    model, ckpt = load_checkpoint(None)
    recorded = ckpt["metrics"][-1]["test_loss"]
    assert test_loss(model, to_pixels(load_mnist(mnist_dir)[1]), seed=ckpt["train_options"]["seed"]) == pytest.approx(recorded, abs=0.01)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a readable PyTorch checkpoint"),
        (b"\x00\x01garbage" * 100, "not a readable PyTorch checkpoint"),
    ],
)
def test_unreadable_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "nope.pth")


def test_truncated_checkpoint(tmp_path, random_checkpoint):
    path = tmp_path / "cut.pth"
    path.write_bytes(random_checkpoint.read_bytes()[: random_checkpoint.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(path)


def _state_dict(**overrides):
    state = VAE().state_dict()
    state.update(overrides)
    return {k: v for k, v in state.items() if v is not None}


@pytest.mark.parametrize(
    "state, message",
    [
        (_state_dict(**{"fc6.bias": None}), r'Missing key\(s\) in state_dict: "fc6.bias"'),
        (_state_dict(extra=torch.zeros(1)), r'Unexpected key\(s\) in state_dict: "extra"'),
        (_state_dict(**{"fc5.weight": torch.zeros(10, 10)}), r"size mismatch for fc5.weight.*torch.Size\(\[10, 10\]\)"),
        (_state_dict(**{"fc1.weight": None}), "not a VAE checkpoint: no fc1.weight"),
        ({"fc1.weight": "not a tensor"}, "not a mapping of names to tensors"),
    ],
)
def test_wrong_keys_or_shapes(tmp_path, state, message):
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=message) as info:
        read_checkpoint(path)
    assert "\n" not in str(info.value)


def test_config_that_contradicts_the_weights(tmp_path):
    path = tmp_path / "liar.pth"
    torch.save({"state_dict": VAE().state_dict(), "config": {"z_dim": 16}}, path)
    with pytest.raises(CheckpointError, match="does not match its weights"):
        read_checkpoint(path)


class _RunsCode:
    def __init__(self, call, marker):
        self.call, self.marker = call, marker

    def __reduce__(self):
        return (open, (self.marker, "w")) if self.call == "open" else (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("call", ["open", "os.system"])  # torch words an allowed-list miss and a blocked module differently
def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path, call):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _RunsCode(call, str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused to load: unpickling it would call"):
        read_checkpoint(path)
    assert not marker.exists()


def test_random_bytes_are_always_a_corrupt_checkpoint(tmp_path):
    """Garbage fails the unpickler in many ways (IndexError, KeyError, odd-protocol warnings...): one message for all."""
    path = tmp_path / "garbage.pth"
    for seed in range(300):
        rng = np.random.default_rng(seed)
        path.write_bytes(rng.bytes(int(rng.integers(1, 8192))))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning would be a second line on the CLI's stderr
            with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
                read_checkpoint(path)


def test_a_sparse_weight_is_refused_without_torch_s_note_on_validating_it(tmp_path):
    model = VAE(VAEConfig(z_dim=2, h1_dim=16, h2_dim=8))
    state = {name: value.to_sparse() if name == "fc5.weight" else value for name, value in model.state_dict().items()}
    torch.save(state, tmp_path / "sparse.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's note would be a second line on the CLI's stderr
        with pytest.raises(CheckpointError, match="fc5.weight is stored as a torch.sparse_coo tensor, not a dense one"):
            load_checkpoint(tmp_path / "sparse.pth")
