"""The parts of `vae-rt serve` that need no server: options, ports, the inference function, doctor's row."""

from __future__ import annotations

import socket
import sys

import numpy as np
import pytest

from vae_rt.errors import OutputOverflow, UserError
from vae_rt.serve import decode_requests, library_path_first, serving_status
from vae_rt.serve_options import ServeOptions
from vae_rt.serve_process import free_loopback_ports


def test_the_inference_function_decodes_merged_requests_once_and_splits_them_back():
    calls = []

    def decode(z: np.ndarray) -> np.ndarray:
        calls.append(z.copy())
        return np.repeat(z[:, :1], 784, axis=1)  # each image carries its latent's first value

    requests = [{"z": np.full((rows, 2), float(rows), np.float32)} for rows in (1, 3, 2)]
    answers = decode_requests(decode)(requests)
    assert len(calls) == 1 and calls[0].shape == (6, 2)
    assert [a["image"].shape for a in answers] == [(1, 784), (3, 784), (2, 784)]
    assert [float(a["image"][0, 0]) for a in answers] == [1.0, 3.0, 2.0]


@pytest.mark.parametrize("error", [UserError("latents contain NaN or Inf"),
                                   OutputOverflow("ort fp32: output has NaN/Inf (latents beyond |z_i| <= 3.39e+25, where it cannot overflow)")],
                         ids=["nan-latents", "overflowing-latents"])
def test_a_refused_batch_says_why_and_that_it_was_merged(error, caplog):
    def decode(z: np.ndarray) -> np.ndarray:
        raise error

    with pytest.raises(ValueError) as caught:
        decode_requests(decode)([{"z": np.zeros((1, 2), np.float32)}] * 2)
    assert str(caught.value) == f"z: {error} (in one of the 2 requests batched with this one); nothing was decoded"
    assert caught.value.__cause__ is None and f"refused 2 request(s): {error}" in caplog.text


@pytest.mark.parametrize("host", ["localhost", "", "::1", "127.0.0.256"])
def test_a_host_that_is_not_an_ipv4_address_is_refused_before_triton_starts(host):
    with pytest.raises(UserError, match=rf"host must be an IPv4 address such as 127.0.0.1, or 0.0.0.0 for every interface; got '{host}'"):
        ServeOptions(host=host).check()


def test_options_are_checked_before_anything_starts():
    with pytest.raises(UserError, match="max_batch must be an integer between 1 and 4194304, got 0"):
        ServeOptions(max_batch=0).check()
    with pytest.raises(UserError, match="max_batch must be an integer between 1 and 4194304, got 2.5"):
        ServeOptions(max_batch=2.5).check()  # the Python API takes what typer would have refused
    with pytest.raises(UserError, match="max_queue_delay_us must be an integer between 0 and 10000000, got 1000000000000"):
        ServeOptions(max_queue_delay_us=10**12).check()
    with pytest.raises(UserError, match="the HTTP and metrics ports are both 9000"):
        ServeOptions(http_port=9000, metrics_port=9000).check()
    with pytest.raises(UserError, match="the gRPC port must be an integer between 1 and 65535, got 70000"):
        ServeOptions(grpc_port=70000).check()
    with pytest.raises(UserError, match="the HTTP port must be an integer between 1 and 65535, got '8000'"):
        ServeOptions(http_port="8000").check()  # a string compared with ints was a TypeError


def test_a_busy_port_is_named_with_its_option():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"gRPC port {port}: 127.0.0.1:{port} is already in use"):
            http, metrics = free_loopback_ports(2)
            ServeOptions(http_port=http, grpc_port=port, metrics_port=metrics).check()


def test_the_interpreters_library_folder_goes_first():
    assert library_path_first("/py/lib", None) == "/py/lib"
    assert library_path_first("/py/lib", "/a:/b") == "/py/lib:/a:/b"


def test_doctor_says_when_serving_cannot_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytriton.triton", None)  # import fails as if not installed
    label, finding = serving_status()
    assert label == "serving" and finding.startswith("not available") and "vae-rt[serve]" in finding
