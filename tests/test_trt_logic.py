"""The plain logic around TensorRT's runtime, on the CPU with stand-ins for `tensorrt` and its objects."""

import re
import threading
from types import ModuleType, SimpleNamespace

import pytest
import torch

from vae_rt import resolve as sampler
from vae_rt.backends.trt import EngineError, io_dtypes
from vae_rt.capabilities import last_message, process_logger
from vae_rt.engine import DEFAULT_MAX_BATCH


def _fake_trt():
    """The parts of `tensorrt` the logger and the I/O check touch."""

    class ILogger:
        Severity = SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self):
            self.initialised = True

    trt = ModuleType("tensorrt")  # a module, as the real one: process_logger keys on it
    trt.ILogger = ILogger
    trt.DataType = SimpleNamespace(FLOAT="float", HALF="half", BF16="bf16", INT8="int8")
    return trt


class FakeEngine:
    def __init__(self, dtypes):
        self.dtypes = dtypes
        self.num_io_tensors = len(dtypes)

    def get_tensor_name(self, index):
        return list(self.dtypes)[index]

    def get_tensor_dtype(self, name):
        return self.dtypes[name]


def test_one_logger_per_process():
    trt = _fake_trt()
    logger = process_logger(trt)
    assert process_logger(trt) is logger and isinstance(logger, trt.ILogger) and logger.initialised


def test_a_call_hears_only_its_own_warnings_and_errors():
    trt = _fake_trt()
    logger = process_logger(trt)
    logger.log(trt.ILogger.Severity.ERROR, "before")
    with logger.collect() as messages:
        logger.log(trt.ILogger.Severity.INFO, "building")
        logger.log(trt.ILogger.Severity.WARNING, "slow tactic")
        thread = threading.Thread(target=logger.log, args=(trt.ILogger.Severity.ERROR, "Engine deserialization failed."))
        thread.start(), thread.join()  # TensorRT may log from its own threads
    logger.log(trt.ILogger.Severity.ERROR, "after")
    assert messages == ["slow tactic", "Engine deserialization failed."]
    assert last_message(messages) == "Engine deserialization failed." and last_message([]) == "no message from TensorRT"


def test_float32_and_fp16_io_plans_are_read_in_their_own_dtypes():
    trt = _fake_trt()
    assert io_dtypes(FakeEngine({"z": "float", "image": "float"}), trt) == (torch.float32, torch.float32)
    assert io_dtypes(FakeEngine({"image": "half", "z": "half"}), trt) == (torch.float16, torch.float16)


@pytest.mark.parametrize("dtypes, message", [
    ({"z": "int8", "image": "float"}, "its 'z' tensor is int8"),
    ({"input": "float", "output": "float"}, "has I/O tensors ['input', 'output']"),
    ({"z": "float"}, "expected 'z' and 'image'"),
])
def test_a_foreign_plan_with_other_io_is_refused(dtypes, message):
    with pytest.raises(EngineError, match=re.escape(message)):
        io_dtypes(FakeEngine(dtypes), _fake_trt())


@pytest.mark.parametrize("serving, opt", [(65536, 65536), (4096, 4096), (1 << 20, DEFAULT_MAX_BATCH)])
def test_the_cached_engine_is_tuned_for_the_serving_batch(monkeypatch, tmp_path, serving, opt):
    calls = []
    monkeypatch.setattr(sampler, "build_engine", lambda *args, **kwargs: calls.append((args, kwargs)) or (tmp_path, True))
    monkeypatch.setenv(sampler.ENGINE_DIR_ENV, str(tmp_path))
    sampler.cached_engine(tmp_path / "dec.fp16.onnx", "onnx", serving)
    ((onnx_path, engine_dir, name, opt_batch), kwargs), = calls
    assert onnx_path == tmp_path / "dec.fp16.onnx" and engine_dir == tmp_path
    assert opt_batch == opt and name == f"dec.fp16.opt{opt}"
    assert kwargs == {"opt_batch_is": "the sampler's batch size"}
