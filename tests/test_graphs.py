"""The CUDA-graph policy shared by the torch and TensorRT backends, with a fake capture on the CPU; the capture itself on a GPU."""

import pytest
import torch

from vae_rt.backends.graphs import CaptureFailed, GraphCache, capture_graph, root_cause
from vae_rt.errors import first_line


class FakeCapture:
    """Stands in for a backend's capture: counts calls, declines the batch sizes in `failing`."""

    def __init__(self, failing=(), error=None):
        self.calls, self.failing, self.error = [], set(failing), error

    def __call__(self, batch):
        self.calls.append(batch)
        if self.error is not None:
            raise self.error
        if batch in self.failing:
            raise CaptureFailed(f"cannot capture {batch}")
        return f"graph-{batch}"


def test_a_batch_size_is_captured_once_and_then_replayed():
    capture = FakeCapture()
    graphs = GraphCache(capture)
    assert graphs.get(7) == "graph-7" and graphs.get(7) == "graph-7"
    assert capture.calls == [7]


def test_the_cache_is_bounded_least_recently_used_first():
    capture = FakeCapture()
    graphs = GraphCache(capture, capacity=2)
    graphs.get(1), graphs.get(2), graphs.get(1), graphs.get(3)  # 2 is now the least recently used
    assert graphs.cached() == [1, 3]
    graphs.get(2)
    assert capture.calls == [1, 2, 3, 2] and graphs.cached() == [3, 2]


def test_no_graph_above_the_largest_batch():
    capture = FakeCapture()
    graphs = GraphCache(capture, max_batch=100)
    assert graphs.get(101) is None and graphs.get(100) == "graph-100"
    assert capture.calls == [100]


def test_a_failed_capture_means_eager_for_that_batch_size_from_then_on(caplog):
    capture = FakeCapture(failing={5})
    graphs = GraphCache(capture)
    assert graphs.get(5) is None and graphs.get(5) is None
    assert capture.calls == [5]  # not retried on every call
    assert graphs.eager == {5} and graphs.get(6) == "graph-6"
    assert "capture failed at batch 5 (cannot capture 5)" in caplog.text


def test_other_errors_are_not_taken_for_a_failed_capture():
    graphs = GraphCache(FakeCapture(error=torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        graphs.get(5)  # the sampler halves its batch on this one
    assert graphs.eager == set()


def test_clear_forgets_graphs_and_failures():
    graphs = GraphCache(FakeCapture(failing={5}))
    graphs.get(4), graphs.get(5)
    graphs.clear()
    assert graphs.cached() == [] and graphs.eager == set()


def test_the_first_error_of_a_chain_is_the_one_reported():
    try:
        try:
            raise CaptureFailed("TensorRT could not enqueue batch 7")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture\nCUDA kernel errors ...")
    except RuntimeError as error:
        assert str(root_cause(error)) == "TensorRT could not enqueue batch 7"
        assert first_line(error) == "CUDA error: operation failed due to a previous error during capture"
    assert first_line(ValueError()) == "ValueError"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False")
def test_capture_records_replays_and_survives_a_failing_capture():
    stream = torch.cuda.Stream()
    x = torch.arange(4.0, device="cuda")
    graph, y = capture_graph(lambda: x * 2, stream)
    x.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    graph.replay()
    torch.cuda.synchronize()
    assert y.tolist() == [2.0, 4.0, 6.0, 8.0]
    before = torch.cuda.current_stream()

    def syncs():
        return x.sum().item()  # a host sync: illegal while capturing

    with pytest.raises(CaptureFailed):
        capture_graph(syncs, stream)
    assert torch.cuda.current_stream() == before  # the caller's stream is back
    assert torch.cuda.is_current_stream_capturing() is False
    assert float((x * 3).sum()) == 30.0  # and the device still works
