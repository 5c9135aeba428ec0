"""The PyTorch backend, the reference: CPU or CUDA, fp32, and fp16/bf16 with CUDA-graph replay on CUDA."""

from __future__ import annotations

from pathlib import Path

import torch

from vae_rt.backends import BaseBackend, Latents, to_device
from vae_rt.backends.graphs import GraphCache, capture_graph
from vae_rt.checkpoint import load_checkpoint
from vae_rt.errors import UserError
from vae_rt.model import IMAGE_SHAPE, Decoder
from vae_rt.overflow import decoder_radius, reference_peaks

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend(BaseBackend):
    """Decodes with the checkpoint's own decoder module, cast to the precision and moved to the device."""

    name = "torch"

    def __init__(self, checkpoint: Path | None, precision: str = "fp32", device: str = "auto", cuda_graphs: bool = True):
        super().__init__(precision, device)
        if precision not in DTYPES:
            raise UserError(f"--backend torch serves {', '.join(DTYPES)}; {precision} runs on --backend ort or openvino")
        self.checkpoint = checkpoint
        self.use_graphs = cuda_graphs and self.device == "cuda"
        self._decoder: Decoder | None = None
        self._graphs: GraphCache[tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = GraphCache(self._capture)

    def describe(self) -> str:
        graphs = " with CUDA graphs" if self.use_graphs else ""
        return f"torch {self.precision} on {self.device}{graphs}"

    def _open(self) -> None:
        model, _ = load_checkpoint(self.checkpoint)
        reference_peaks(model, self.checkpoint.name if self.checkpoint else "the bundled model")  # as export refuses it
        self.z_dim = model.config.z_dim
        decoder = model.decoder()
        if self.device == "cpu":
            self.finite_radius = decoder_radius(decoder, self.precision)  # from the float32 weights, before the cast
        self._decoder = decoder.in_precision(DTYPES[self.precision]).to(self.device).eval()

    def _close(self) -> None:
        self._decoder = None
        self._graphs.clear()

    @torch.inference_mode()
    def _forward(self, z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[B, z_dim] -> float32 [B, 784], written into `out` ([B, 784] float32) when given."""
        # The sigmoid in float32: fp16 / bf16 round 1 - p to 2^-11 / 2^-8, +0.46 / +0.08 nats of test loss.
        images = self._decoder.logits(z).float().sigmoid_()
        return images if out is None else out.copy_(images)

    def _decode(self, z: Latents, out: torch.Tensor | None) -> torch.Tensor:
        z = to_device(z, self.device)
        flat_out = out.view(len(z), -1) if out is not None else None
        entry = self._graphs.get(len(z)) if self.use_graphs else None
        images = self._replay(entry, z, flat_out) if entry is not None else self._forward(z, flat_out)
        if self.device == "cuda":
            torch.cuda.current_stream().synchronize()
        return images.view(len(z), *IMAGE_SHAPE)

    def _capture(self, batch: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """A graph of the decoder at `batch` rows, with its static input and output buffers."""
        static_z = torch.zeros((batch, self.z_dim), device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(static_z)  # warm-up outside capture: cuBLAS picks and allocates its workspace
        torch.cuda.current_stream().wait_stream(side)
        graph, static_out = capture_graph(lambda: self._forward(static_z), side)
        return graph, static_z, static_out

    @staticmethod
    def _replay(entry: tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor], z: torch.Tensor,
                out: torch.Tensor | None) -> torch.Tensor:
        """Run a captured graph on `z`; returns a fresh tensor or `out`."""
        graph, static_z, static_out = entry
        static_z.copy_(z)
        graph.replay()
        # The static buffer is overwritten by the next replay: hand out a copy.
        return static_out.clone() if out is None else out.copy_(static_out)


def create(checkpoint: Path | None = None, precision: str = "fp32", device: str = "auto", **options: bool) -> TorchBackend:
    return TorchBackend(checkpoint, precision, device, **options)
