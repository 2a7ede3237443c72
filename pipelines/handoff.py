"""Handing a DALI pipeline's outputs to torch: zero copy, ordered on torch's stream, no host sync.

``take(pipe, device, device_id)`` asks the pipeline for its next outputs bound to the CUDA stream that is
current in torch (``share_outputs(cuda_stream=...)``; torch's default stream is passed as the legacy default
stream): that stream waits on DALI's ready event, so DALI's work is ordered before the model's kernels
without a host synchronisation. Without a stream (DALI's default, and what DALI's own torch iterator does)
``share_outputs`` blocks the host until every batch is complete.

``to_torch(tensor_list, ...)`` wraps one output as a torch tensor over DALI's own memory (DLPack). The
memory stays DALI's until the last torch reference (or view) goes; DALI then frees it from a background
thread after a device synchronisation (DALI 2.4's DLPack deleter), so a batch can be dropped while kernels
reading it are still queued, on any stream.
"""

from __future__ import annotations

import torch
from nvidia.dali.backend import TensorGPU


def stream_of(device: str, device_id: int | None):
    """torch's current stream on the pipeline's GPU, or None for a CPU pipeline."""
    return torch.cuda.current_stream(device_id) if device == "gpu" else None


def take(pipe, device: str, device_id: int | None):
    """The pipeline's next outputs (``share_outputs``), bound to torch's current stream on a GPU."""
    stream = stream_of(device, device_id)
    return pipe.share_outputs() if stream is None else pipe.share_outputs(cuda_stream=stream)


def to_torch(tensor_list, device: str, device_id: int | None) -> torch.Tensor:
    """One dense output (a DALI TensorList) as a torch tensor sharing its memory: no copy, no host trip."""
    t = tensor_list.as_tensor()
    if isinstance(t, TensorGPU):
        with torch.cuda.device(device_id):
            return torch.from_dlpack(t)
    return torch.from_dlpack(t)
