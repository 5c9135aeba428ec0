"""`vae-rt doctor`: what is installed and usable here, and what each backend would run on."""

from __future__ import annotations

import platform

import torch

from vae_rt import __version__
from vae_rt.capabilities import available_providers, engine_skip_reason, native_bf16
from vae_rt.machine import cpu_isa, cpu_model
from vae_rt.serve import serving_status


def diagnose() -> list[tuple[str, str]]:
    """(label, finding) rows: versions, CPU, CUDA, GPU, ONNX Runtime providers, OpenVINO, TensorRT, serving."""
    rows = [
        ("vae-rt", __version__),
        ("python", platform.python_version()),
        ("CPU", f"{cpu_model()}; {', '.join(cpu_isa()) or 'no AVX2, AVX-512 or AMX'}"),
        ("torch", f"{torch.__version__} ({torch.get_num_threads()} CPU threads)"),
    ]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        rows += [("CUDA", f"{torch.version.cuda}"), ("GPU", f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})")]
    else:
        rows += [("CUDA", "not available to torch (CPU only)")]
    try:
        import onnxruntime

        rows += [("onnxruntime", f"{onnxruntime.__version__}; providers: {', '.join(available_providers())}")]
    except ImportError:
        rows += [("onnxruntime", "not installed (pip install 'vae-rt[cpu]', or '[gpu]' for CUDA)")]
    try:
        import openvino

        bf16 = "native bf16: yes" if native_bf16() else "native bf16: no (its bf16 is refused here)"
        rows += [("openvino", f"{openvino.__version__.split('-')[0]}; {bf16}")]
    except ImportError:
        rows += [("openvino", "not installed (pip install 'vae-rt[cpu]')")]
    try:
        import tensorrt

        rows += [("tensorrt", tensorrt.__version__)]
    except ImportError:
        rows += [("tensorrt", "not installed (pip install 'vae-rt[gpu]')")]
    reason = engine_skip_reason()
    rows += [("TensorRT engines", "can be built here" if reason is None else f"cannot be built: {reason}")]
    rows += [serving_status()]
    return rows
