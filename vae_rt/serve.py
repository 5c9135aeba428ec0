"""`vae-rt serve`: the Sampler behind Triton's HTTP/gRPC protocol, in an embedded Triton (PyTriton).

The model `vae_decoder` takes `z` FP32 [-1, z_dim] and answers `image` FP32 [-1, 784]: the names,
dims and dtypes of the model `vae-rt export --triton` writes, so a client moves to a real Triton
server unchanged. Triton's dynamic batcher merges concurrent requests into one
call of the inference function; one instance runs at a time, so one backend serves them safely.
Triton itself rejects a wrong shape or dtype and a batch above the maximum; NaN/Inf is refused here.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vae_rt.errors import OutputOverflow, RuntimeFailure, UserError, require
from vae_rt.model import IMAGE_SHAPE, INPUT_NAME, OUTPUT_NAME
from vae_rt.serve_options import ServeOptions
from vae_rt.triton import MODEL_NAME

log = logging.getLogger(__name__)

IMAGE_SIZE = math.prod(IMAGE_SHAPE)  # images travel flat: [-1, 784], as in the exported models
EXIT_TIMEOUT_S = 20  # Triton's wait for open connections and in-flight requests; PyTriton kills it after 30
InferFunction = Callable[[list[Any]], list[dict[str, np.ndarray]]]


def python_library() -> Path | None:
    """This interpreter's own libpython, when it has one (pyenv and conda builds do; static builds do not)."""
    name = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    path = Path(sysconfig.get_config_var("LIBDIR") or "") / (name or "")
    return path if name and path.is_file() else None


def library_path_first(directory: str, current: str | None) -> str:
    """LD_LIBRARY_PATH with `directory` first.

    PyTriton's Python-backend stub links `libpython3.X.so` by name: without this the loader finds the
    system's copy, which then runs this interpreter's stdlib and fails at model load.
    """
    return f"{directory}:{current}" if current else directory


def decode_requests(decode: Callable[[np.ndarray], Any]) -> InferFunction:
    """The inference function: the requests Triton batched together, decoded in one call, split back.

    A request with NaN/Inf, or latents so large that the decoder overflows, fails the whole merged
    batch (PyTriton answers one call with one error), so the message tells the others why.
    """

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        latents = [request[INPUT_NAME] for request in requests]
        z = latents[0] if len(latents) == 1 else np.concatenate(latents)
        try:
            images = decode(z)
        except (UserError, OutputOverflow) as error:  # the latents' fault: refused, or overflowing the decoder
            where = "this request" if len(requests) == 1 else f"one of the {len(requests)} requests batched with this one"
            log.warning("refused %d request(s): %s", len(requests), error)
            raise ValueError(f"{INPUT_NAME}: {error} (in {where}); nothing was decoded") from None
        flat = np.asarray(images.reshape(len(z), IMAGE_SIZE))
        bounds = np.cumsum([len(part) for part in latents[:-1]])
        return [{OUTPUT_NAME: part} for part in np.split(flat, bounds)]

    return infer


def sampler_decode(sampler: Any) -> Callable[[np.ndarray], Any]:
    """Sampler.decode with the images brought to host memory (a no-op on the CPU)."""
    return lambda z: sampler.decode(z).cpu().numpy()


def serve_model(
    infer: InferFunction, z_dim: int, options: ServeOptions, on_ready: Callable[[], None], name: str = MODEL_NAME
) -> None:
    """Run Triton with `infer` bound as model `name` until SIGTERM or Ctrl-C; then drain and return.

    Raises:
        UserError: a bad option, a busy port, pytriton missing, or a model Triton cannot load.
    """
    options.check()
    triton = require("pytriton.triton", extra="serve")
    model_config = require("pytriton.model_config", extra="serve")
    from tritonclient.utils import InferenceServerException  # a dependency of pytriton

    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:  # inherited by tritonserver, which PyTriton starts with a copy of this process's environment
        os.environ["LD_LIBRARY_PATH"] = library_path_first(libdir, os.environ.get("LD_LIBRARY_PATH"))
    with tempfile.TemporaryDirectory(prefix="vae-rt-serve-") as scratch:
        config = triton.TritonConfig(
            http_address=options.host, http_port=options.http_port,
            grpc_address=options.host, grpc_port=options.grpc_port,
            metrics_address=options.host, metrics_port=options.metrics_port,
            allow_gpu_metrics=False, exit_timeout_secs=EXIT_TIMEOUT_S,
            log_file=None if options.triton_log else Path(scratch) / "triton.log",
        )
        stop_requested: list[int] = []
        serving = False  # True once Triton serves the model (read by request_stop)

        def request_stop(signum: int, frame: object) -> None:
            stop_requested.append(signum)
            # PyTriton's serve() answers KeyboardInterrupt by draining Triton and returning. While the model
            # is being bound, one raised in PyTriton's code is printed as a traceback: the first signal then
            # waits for the binding (seconds) and stops after it; a second one stops at once.
            if serving or len(stop_requested) > 1:
                raise KeyboardInterrupt

        previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            with triton.Triton(config=config, workspace=Path(scratch) / "workspace") as server:
                try:
                    server.bind(
                        model_name=name, infer_func=infer,
                        inputs=[model_config.Tensor(name=INPUT_NAME, dtype=np.float32, shape=(z_dim,))],
                        outputs=[model_config.Tensor(name=OUTPUT_NAME, dtype=np.float32, shape=(IMAGE_SIZE,))],
                        config=model_config.ModelConfig(
                            max_batch_size=options.max_batch,
                            batcher=model_config.DynamicBatcher(max_queue_delay_microseconds=options.max_queue_delay_us),
                        ),
                    )
                except InferenceServerException as error:
                    raise UserError(f"Triton could not load the model {name}: {first_line(error.message())}") from None
                if stop_requested:  # asked to stop while the model was being bound
                    return
                serving = True
                on_ready()
                server.serve()  # returns after Triton drained on Ctrl-C/SIGTERM, or when Triton died
        except KeyboardInterrupt:
            pass  # a signal while starting or stopping: the `with` has stopped Triton all the same
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if not stop_requested:
            raise RuntimeFailure("Triton stopped by itself (run with --triton-log to see why)")


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no reason given"


def serve(sampler: Any, options: ServeOptions, on_ready: Callable[[], None]) -> None:
    """Serve `sampler` as the model `vae_decoder` (see `serve_model`)."""
    serve_model(decode_requests(sampler_decode(sampler)), sampler.z_dim, options, on_ready)


def startup_line(what: str, options: ServeOptions, name: str = MODEL_NAME) -> str:
    """The one line `vae-rt serve` prints once Triton answers: what runs where."""
    return (f"serving {name} ({what}) on {options.urls()}; dynamic batching up to {options.max_batch} latents, "
            f"{options.max_queue_delay_us} µs queue delay; Ctrl-C or SIGTERM stops")


def serving_status() -> tuple[str, str]:
    """(label, finding) for `vae-rt doctor`: can `vae-rt serve` run here?"""
    from importlib.metadata import version

    try:
        import pytriton.triton  # noqa: F401  (the import that fails on numpy 2 or a missing package)
    except ImportError as error:
        return "serving", f"not available: pytriton does not import ({error}); pip install 'vae-rt[serve]'"
    found = f"nvidia-pytriton {version('nvidia-pytriton')}"
    if int(np.__version__.split(".")[0]) >= 2:
        return "serving", f"{found}, but numpy {np.__version__}: PyTriton needs numpy < 2"
    library = python_library()
    if library is None:
        return "serving", (f"{found}; no shared libpython in {sysconfig.get_config_var('LIBDIR')}: the Python backend "
                           "loads the system's, which must match this interpreter")
    return "serving", f"{found}; libpython {library} (put first on Triton's LD_LIBRARY_PATH by vae-rt serve)"
