"""The commands as a user types them (through typer's CliRunner): outputs, and one-line errors with exit 2."""

import re

import numpy as np
import pytest
import torch
import typer
from cli_runner import assert_one_line_error, run

from vae_rt.capabilities import native_bf16
from vae_rt.cli import app
from vae_rt.machine import cpu_model

pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default outputs (samples.png, export/) land here, not in the checkout


def test_sample_counts_its_time_from_the_first_vae_rt_import(tmp_path, monkeypatch):
    import vae_rt

    monkeypatch.setattr(vae_rt, "STARTED", vae_rt.STARTED - 1000)  # as if importing had taken 1000 s
    code, output = run("sample", "-n", 4, "--out", tmp_path / "s.png")
    wrote = next(line for line in output.splitlines() if line.startswith("wrote"))
    assert code == 0 and " in 10" in wrote.split("(")[0], output


def test_sample_png_and_npy_agree_across_backends(tmp_path):
    code, output = run("sample", "-n", 16, "--out", tmp_path / "s.png")
    assert code == 0 and "wrote 16 images" in output and "samples/s" in output
    assert (tmp_path / "s.png").stat().st_size > 0
    for backend in ("torch", "ort"):
        code, output = run("sample", "--backend", backend, "-n", 1024, "--seed", 0, "--out", tmp_path / f"{backend}.npy")
        assert code == 0 and f"with {backend} fp32" in output, output
    torch_images, ort_images = np.load(tmp_path / "torch.npy"), np.load(tmp_path / "ort.npy")
    assert torch_images.shape == (1024, 1, 28, 28) and np.abs(torch_images - ort_images).max() <= 1e-5


def test_sample_fp16_on_ort_is_within_fp16_tolerance(tmp_path):
    run("sample", "--backend", "torch", "-n", 512, "--out", tmp_path / "ref.npy")
    code, output = run("sample", "--backend", "ort", "--precision", "fp16", "-n", 512, "--out", tmp_path / "h.npy")
    assert code == 0 and "ort fp16" in output
    diff = np.abs(np.load(tmp_path / "ref.npy") - np.load(tmp_path / "h.npy"))
    assert diff.max() <= 5e-3 and diff.mean() <= 5e-4


def test_sample_auto_says_which_backend_ran_and_why_once_with_v(tmp_path):
    code, output = run("sample", "--backend", "auto", "--device", "cpu", "-n", 8, "--out", tmp_path / "a.npy")
    assert code == 0 and "with auto on cpu: " in output and "backend auto:" not in output
    code, output = run("-v", "sample", "--backend", "auto", "--device", "cpu", "-n", 8, "--out", tmp_path / "a.npy")
    assert code == 0 and output.count("backend auto: per batch size, the fastest of") == 1, output


def test_sample_counts_the_whole_command_and_says_when_it_exports(tmp_path, random_checkpoint, monkeypatch):
    monkeypatch.setenv("VAE_RT_CACHE_DIR", str(tmp_path / "fresh-cache"))
    code, output = run("sample", "--model", random_checkpoint, "--backend", "ort", "-n", 8, "--out", tmp_path / "a.npy")
    assert code == 0 and output.count("exporting random.pth to ONNX fp32 (once") == 1, output
    total, decoding = map(float, re.search(r"in ([\d.]+)s \(decode and write ([\d.]+)s", output).groups())
    assert total > decoding  # the export is counted in the total
    code, output = run("sample", "--model", random_checkpoint, "--backend", "ort", "-n", 8, "--out", tmp_path / "a.npy")
    assert code == 0 and "exporting" not in output  # cached


def test_a_png_sample_times_the_decode_alone(tmp_path):
    """The PNG writer's first use imports torchvision (seconds): a rate counting it would read 71 samples/s for 64."""
    code, output = run("sample", "--backend", "torch", "--device", "cpu", "-n", 16, "--out", tmp_path / "s.png")
    assert code == 0 and re.search(r"\(decode [\d.]+s: [\d,]+ samples/s\)", output), output


def test_manifold_refuses_a_latent_space_that_is_not_2d_before_any_export(tmp_path, monkeypatch):
    from vae_rt.model import VAE, VAEConfig

    monkeypatch.setenv("VAE_RT_CACHE_DIR", str(tmp_path / "cache"))
    torch.save(VAE(VAEConfig(z_dim=8, h1_dim=64, h2_dim=32)).state_dict(), tmp_path / "z8.pth")
    assert_one_line_error(["manifold", "--model", tmp_path / "z8.pth", "--out", tmp_path / "m.png"], "2-D latent space", "z_dim=8")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "m.png").exists()  # no ONNX export, no tuning run


def test_version():
    from vae_rt import __version__

    assert run("--version") == (0, f"vae-rt {__version__}\n")


def test_export_writes_both_onnx_files_and_skips_the_engine(tmp_path, tutorial_state_dict):
    # --max-batch below the default opt batch: the opt batch follows it down
    code, output = run("export", tutorial_state_dict, "--out-dir", tmp_path / "export", "--triton", tmp_path / "triton",
                       "--max-batch", 8192)
    assert code == 0, output
    for precision in ("fp32", "fp16"):
        assert (tmp_path / "export" / f"checkpoint_8.{precision}.onnx").is_file()
        assert (tmp_path / "export" / f"checkpoint_8.{precision}.onnx.json").is_file()
    assert "PASS fp32" in output and "PASS fp16" in output and "within fp16 range" in output
    assert (tmp_path / "triton" / "vae_decoder" / "1" / "model.onnx").is_file()
    from vae_rt.capabilities import engine_skip_reason

    assert ("engine skipped:" in output) == (engine_skip_reason() is not None)


def test_export_refuses_a_triton_folder_it_cannot_write_before_any_export(tmp_path, tutorial_state_dict):
    (tmp_path / "taken").write_text("a file where the repository should go")
    assert_one_line_error(["export", tutorial_state_dict, "--out-dir", tmp_path / "export", "--triton", tmp_path / "taken"],
                          "--triton", "a file of that name is in the way")
    assert not (tmp_path / "export").exists()  # refused before the ONNX files, not after


def test_export_with_engine_required_but_impossible_exits_2(tmp_path):
    from vae_rt.capabilities import engine_skip_reason

    if engine_skip_reason() is None:
        pytest.skip("TensorRT can build engines here")
    assert_one_line_error(["export", "--engine", "--out-dir", tmp_path], "engine: cannot build a TensorRT engine here")
    if "not installed" in engine_skip_reason():
        assert_one_line_error(["export", "--engine", "--out-dir", tmp_path], "pip install 'vae-rt[gpu]'")  # not eaten as markup
    assert not list(tmp_path.iterdir())


def test_compare_reports_every_pair(tmp_path):
    code, output = run("compare", "--backends", "torch,ort,trt", "--precisions", "fp32,fp16", "-n", 200)
    assert code == 0, output
    assert "Δ test loss" in output  # the quality gate's column, beside max/mean abs
    assert output.count("PASS") >= 3 and "skipped" in output  # trt cannot run here


def test_compare_shows_a_pair_whose_export_fails_as_a_fail_row_beside_the_others(monkeypatch):
    import vae_rt.compare
    from vae_rt.errors import RuntimeFailure

    def open_sampler(model, backend, precision, device):
        if precision == "int8":
            raise RuntimeFailure("the int8 export of model.pth not written: quality gate FAIL int8 test loss +1.175 nats")
        return real_open_sampler(model, backend, precision, device)

    real_open_sampler = vae_rt.compare.open_sampler
    monkeypatch.setattr(vae_rt.compare, "open_sampler", open_sampler)
    code, output = run("compare", "--backends", "ort", "--precisions", "fp32,int8", "-n", 10, "--no-quality")
    assert code == 1, output
    (int8_row,) = [line for line in output.splitlines() if "│ int8" in line]
    assert output.count("PASS") == 1 and "FAIL" in int8_row and "Traceback" not in output
    assert "failed ort int8: the int8 export of model.pth not written: quality gate FAIL" in output


def test_compare_without_mnist_names_the_way_to_pixel_errors_alone(tmp_path):
    assert_one_line_error(["compare", "--backends", "torch", "--precisions", "fp32", "-n", 10, "--data-dir", tmp_path],
                          str(tmp_path), "--no-quality")
    code, output = run("compare", "--backends", "torch", "--precisions", "fp32", "-n", 10, "--data-dir", tmp_path, "--no-quality")
    assert code == 0 and "PASS" in output, output


def test_eval_gates_a_backend_and_precision(mnist_dir):
    code, output = run("eval", "--data-dir", mnist_dir, "--limit", 300, "--backend", "torch", "--precision", "bf16", "--device", "cpu")
    assert code == 0 and "PASS bf16 test loss" in output and "(limit +0.05, 300 test images) with torch bf16 on cpu" in output


def test_eval_through_auto_judges_every_engine_it_holds_by_its_own_limit(mnist_dir):
    code, output = run("eval", "--data-dir", mnist_dir, "--limit", 300, "--precision", "auto", "--device", "cpu")
    judged = [line for line in output.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert code == 0 and len(judged) >= 1, output
    for line in judged:  # fp32 has no loss limit (it is held to max abs); every reduced precision has one
        assert line.startswith("PASS fp32") or "(limit +0." in line, line
        assert " auto " not in line, line


def test_manifold_and_eval_and_doctor(tmp_path, mnist_dir):
    code, output = run("manifold", "--grid", 5, "--out", tmp_path / "m.png")
    assert code == 0 and (tmp_path / "m.png").is_file(), output
    code, output = run("eval", "--data-dir", mnist_dir, "--limit", 200, "--iw-samples", 50)
    assert code == 0 and "test loss per image" in output and "-log p(x), 50 importance samples" in output, output
    code, output = run("doctor")
    assert code == 0 and "onnxruntime" in output and "CPUExecutionProvider" in output
    assert f"native bf16: {'yes' if native_bf16() else 'no'}" in output or "openvino               not installed" in output, output
    assert f"CPU                    {cpu_model()}" in output, output


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "-n", 0], "'-n' / '--count': Input should be greater than or equal to 1"),
        (["sample", "-n", -5], "'-n' / '--count': Input should be greater than or equal to 1"),
        (["sample", "--batch-size", 0, "--out", "{tmp}/x.npy"], "'--batch-size': Input should be greater than or equal to 1"),
        (["sample", "--batch-size", 10**9, "--out", "{tmp}/x.npy"], "'--batch-size': Input should be less than or equal to"),
        (["sample", "--backend", "tensorflow"], "'--backend': 'tensorflow' is not one of 'auto', 'torch'"),
        (["sample", "--precision", "int4"], "'--precision': 'int4' is not one of 'fp32'"),
        (["sample", "--device", "tpu"], "'--device': 'tpu' is not one of 'auto', 'cpu', 'cuda'"),
        (["sample", "--bogus"], "No such option: --bogus"),
        (["sample", "--out", "{tmp}/nowhere/x.png"], "does not exist"),
        (["sample", "--out", "{tmp}/x.gif"], "unsupported extension"),
        (["sample", "--model", "{tmp}/missing.pth"], "no such file"),
        (["sample", "--model", "{tmp}/junk.pth"], "not a readable PyTorch checkpoint"),
        (["sample", "--model", "{tmp}/junk.onnx", "--backend", "ort"], "not a readable ONNX model"),
        (["export", "{tmp}/missing.pth", "--out-dir", "{tmp}/e"], "no such checkpoint file"),
        (["export", "--precision", "int4", "--out-dir", "{tmp}/e"], "--precision takes a comma-separated list of fp32, fp16, int8"),
        (["compare", "--backends", "torch,onnx"], "--backends takes a comma-separated list of auto, torch, ort, trt"),
        (["compare", "--precisions", "fp8"], "--precisions takes a comma-separated list of fp32, fp16, bf16, int8"),
        (["bench", "--backends", "tensorrt"], "--backends takes a comma-separated list of"),
        (["bench", "--precisions", ","], "--precisions takes a comma-separated list of"),
        (["bench", "--json", "{tmp}"], "is a folder; give a file name"),
        (["bench", "--plot", "{tmp}/nowhere/b.png"], "/nowhere does not exist"),
        (["export", "--max-batch", 8, "--opt-batch", 16, "--out-dir", "{tmp}/e"], "--opt-batch must be at most --max-batch (8)"),
        (["train", "--epochs", 0, "--out", "{tmp}/r"], "'--epochs': Input should be greater than or equal to 1"),
        (["train", "--lr", "nan", "--epochs", 1, "--out", "{tmp}/r"], "lr must be a positive finite number"),
        (["train", "--epochs", 1, "--out", "{tmp}/junk.pth"], "a file of that name is in the way"),
        (["export", "--out-dir", "{tmp}/junk.pth/e"], "cannot create the folder (Not a directory)"),
        (["eval", "{tmp}/junk.pth"], "not a readable PyTorch checkpoint"),
        (["eval", "{tmp}/junk.onnx"], "junk.onnx: an ONNX model, not a PyTorch checkpoint; use the .pth"),
        (["sample", "--out", "{tmp}"], "is a folder; give a file name"),
        (["eval", "--data-dir", "{tmp}/no-mnist"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "junk.pth").write_bytes(b"\x00\x01\x02 random bytes" * 50)
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01\x02 random bytes" * 50)
    assert_one_line_error([str(a).format(tmp=tmp_path) for a in args], message)


def test_a_path_the_system_refuses_is_one_line_and_exit_2(tmp_path, monkeypatch):
    def refuse(images, path, nrow=None):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("vae_rt.output.write_png", refuse)  # root ignores chmod, so the refusal is simulated
    assert_one_line_error(["sample", "-n", 4, "--backend", "torch", "--out", tmp_path / "s.png"], "s.png: Permission denied")


@pytest.mark.parametrize("command", [["sample"], ["manifold"], ["compare"], ["bench", "--duration", "0.01"], ["train"], ["serve"]])
def test_device_cuda_without_cuda_exits_2_on_every_command(tmp_path, command):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line_error([*command, "--device", "cuda"], "'--device': torch sees no CUDA GPU")
    assert not list(tmp_path.iterdir())  # refused before any work


def test_train_prints_one_line_per_epoch_and_writes_the_run(tmp_path, mnist_dir, small_mnist):
    code, output = run("train", "--epochs", 1, "--data-dir", mnist_dir, "--out", tmp_path / "run", "--device", "cpu")
    assert code == 0, output
    assert "epoch   1  train loss" in output and "test loss" in output and "done: 1 epoch, test loss" in output
    assert (tmp_path / "run" / "model.pth").is_file() and (tmp_path / "run" / "checkpoint_1.pth").is_file()


@pytest.mark.parametrize("command", ["train", "eval", "export", "sample", "manifold", "compare", "bench", "doctor", "serve"])
def test_help_texts_keep_their_brackets(command):
    """rich reads some `[...]` in help texts as markup and silently drops them from --help."""
    code, output = run(command, "--help")
    assert code == 0, output
    shown = " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())
    for param in typer.main.get_command(app).commands[command].params:
        for bracketed in re.findall(r"\[[^\]]*\]", getattr(param, "help", None) or ""):
            assert " ".join(bracketed.split()) in shown, f"{command} --help lost {bracketed!r}"


def test_auto_says_once_that_it_times_the_engines_here(tmp_path, random_checkpoint, monkeypatch):
    from vae_rt import tuning
    from vae_rt.resolve import cached_onnx

    model = cached_onnx(random_checkpoint, "fp32")
    monkeypatch.setenv("VAE_RT_CACHE_DIR", str(tmp_path / "cache"))  # no timings cached yet
    fake = {label: dict.fromkeys(tuning.PROBE_BATCHES, 1e-3) for label in ("ort fp32", "openvino fp32")}
    monkeypatch.setattr(tuning, "measure", lambda calls, z_dim: {label: fake[label] for label in calls})
    outputs = [run("sample", "--model", model, "-n", 4, "--out", tmp_path / f"{k}.png")[1] for k in range(2)]
    assert "backend auto: timing" in outputs[0] and "(once; cached)" in outputs[0], outputs[0]
    assert "timing" not in outputs[1], outputs[1]
