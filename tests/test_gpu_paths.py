"""The CUDA paths that need a GPU: graph capture and its fallback in the torch backend, and a strict fp32 TensorRT build.

Their CPU-side logic is tested in test_graphs.py, test_engine.py and test_trt_logic.py.
"""

import threading

import pytest
import torch

from vae_rt.backends.pt import TorchBackend
from vae_rt.capabilities import engine_skip_reason
from vae_rt.parity import compare
from vae_rt.sampler import draw_latents

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False"),
]


def _eager_and_graphed(checkpoint, precision="fp32"):
    """fp32 (no TF32 in torch's matmuls by default): replay and eager may differ only by kernel choice."""
    return (TorchBackend(checkpoint, precision, "cuda", cuda_graphs=False).open(),
            TorchBackend(checkpoint, precision, "cuda", cuda_graphs=True).open())


def test_graph_replay_matches_eager_at_each_batch_size(random_checkpoint):
    eager, graphed = _eager_and_graphed(random_checkpoint)
    for batch in (1, 7, 64, 1000, 7):
        z = draw_latents(batch, 2, seed=batch).cuda()
        torch.testing.assert_close(graphed.decode(z), eager.decode(z), atol=1e-6, rtol=0)
    assert graphed._graphs.cached() == [1, 64, 1000, 7] and graphed._graphs.eager == set()


def test_a_failing_capture_decodes_eagerly_and_remembers_it(random_checkpoint, monkeypatch):
    eager, graphed = _eager_and_graphed(random_checkpoint)
    z8 = draw_latents(8, 2, seed=8).cuda()
    graphed.decode(z8)  # captured before the failure
    torch.cuda.manual_seed(0)
    expected_random = torch.rand(5, device="cuda")
    torch.cuda.manual_seed(0)
    forward = graphed._forward

    def forward_that_syncs_while_capturing(z, out=None):
        if torch.cuda.is_current_stream_capturing():
            z.sum().item()  # a host sync: the capture fails
        return forward(z, out)

    monkeypatch.setattr(graphed, "_forward", forward_that_syncs_while_capturing)
    z = draw_latents(64, 2, seed=1).cuda()
    torch.testing.assert_close(graphed.decode(z), eager.decode(z), atol=1e-6, rtol=0)
    assert graphed._graphs.eager == {64} and graphed._graphs.cached() == [8]
    torch.testing.assert_close(graphed.decode(z), eager.decode(z), atol=1e-6, rtol=0)  # again, no second capture
    # torch's default generator and the graph captured before are not left broken by the failure
    torch.testing.assert_close(torch.rand(5, device="cuda"), expected_random, atol=0, rtol=0)
    torch.testing.assert_close(graphed.decode(z8), eager.decode(z8), atol=1e-6, rtol=0)


def test_capture_survives_cuda_work_on_another_thread(random_checkpoint):
    """The .npy writer waits on events and copies while the decoder captures: thread-local capture allows it."""
    _, graphed = _eager_and_graphed(random_checkpoint)
    stop = threading.Event()
    source = torch.rand(4096, 784, device="cuda")

    def writer():
        while not stop.is_set():
            source.cpu()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for batch in range(1, 9):
            graphed.decode(draw_latents(batch, 2, seed=batch).cuda())
    finally:
        stop.set()
        thread.join()
    assert graphed._graphs.eager == set() and len(graphed._graphs.cached()) == 8


@pytest.mark.skipif(engine_skip_reason() is not None, reason=f"needs TensorRT and a GPU: {engine_skip_reason()}")
def test_an_fp32_onnx_gives_a_strict_fp32_engine(tmp_path, random_checkpoint):
    from vae_rt.artifacts import read_manifest
    from vae_rt.backends.trt import TrtBackend
    from vae_rt.checkpoint import load_checkpoint
    from vae_rt.engine import build_engine
    from vae_rt.export import export_onnx

    onnx_path = export_onnx(random_checkpoint, tmp_path / "export", "fp32").path
    plan, _ = build_engine(onnx_path, tmp_path / "engines", "random.fp32", opt_batch=1000, max_batch=4096)
    assert read_manifest(plan)["spec"]["tf32"] is False
    model = load_checkpoint(random_checkpoint)[0]
    z = draw_latents(1000, 2, seed=0) * 4
    with TrtBackend(plan, cuda_graphs=True) as backend, torch.no_grad():
        assert backend.precision == "fp32"
        report = compare(model.decode(z), backend.decode(z.cuda()).cpu(), "fp32")
    assert report.passed, report.summary()  # 1e-5: TF32 would miss it
