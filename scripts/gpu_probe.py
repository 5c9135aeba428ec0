"""The first step of gpu_check.sh: what can run on this GPU machine, and why each path that cannot is skipped.

Exits 1 when torch sees no CUDA GPU (nothing else can be checked then); prints one `SKIP` line per GPU
path that cannot run here, which the check's summary collects.
"""

import sys

import torch

from vae_rt.capabilities import CUDA_EP, available_providers, engine_skip_reason


def main() -> int:
    print("torch", torch.__version__, "CUDA", torch.version.cuda)
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: nothing here can be checked", file=sys.stderr)
        return 1
    print("GPU", torch.cuda.get_device_name(), "sm", ".".join(map(str, torch.cuda.get_device_capability())))
    reason = engine_skip_reason()
    if reason:
        print("SKIP trt (backend, tests, bench rows):", reason)
    providers = available_providers()
    if CUDA_EP not in providers:
        print("SKIP ort-cuda (backend, tests, bench rows): onnxruntime has no CUDAExecutionProvider",
              f"(providers: {', '.join(providers) or 'onnxruntime not installed'}; onnxruntime-gpu is needed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
