"""Peak memory of a training run, as ``eval.json`` records it (``peak_memory_mb``, ``peak_memory_kind``,
``peak_memory_scope``).

- CUDA (``peak_memory_kind`` ``"cuda_max_allocated"``): ``torch.cuda.max_memory_allocated`` of the
  run's device, in MiB: the tensors PyTorch allocated at the peak. The caching allocator's reserved
  but unused blocks and the CUDA context (a few hundred MiB) are not included, so ``nvidia-smi`` shows
  more. The counter is reset when the run starts (``peak_memory_scope`` ``"run"``).
- CPU (``"cpu_peak_rss"``): the process's peak resident set size, ``resource.getrusage(RUSAGE_SELF)
  .ru_maxrss`` in MiB: everything resident in the training process (Python, the libraries, the model,
  optimizer state, activations, the main process's data loading; DataLoader worker processes are not
  included). On Linux the high-water mark is reset when the run starts (writing ``5`` to
  ``/proc/self/clear_refs`` resets the mark that ``getrusage`` reports), so a run in a process that did
  other work first (a sweep trains many points in one process) reports its own peak
  (``peak_memory_scope`` ``"run"``); where that reset is unavailable the value is the process's peak
  since it started (``"process"``).

Under ``torchrun`` the recorded value is the largest over the ranks. After ``--resume`` it is the peak
of the segment that finished the run (the same workload as the segments before it).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

from .distributed import Dist

_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_PEAK_RSS = "5"  # Linux proc(5): "5" resets the peak resident set size ("high water mark")


class PeakMemory:
    """Reset the peak counter of ``device`` now; :meth:`record` reads it later."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.kind, self.scope = "cuda_max_allocated", "run"
        else:
            self.kind, self.scope = "cpu_peak_rss", "run" if _reset_peak_rss() else "process"

    def peak_mb(self) -> float:
        """This process's peak since construction (see the module docstring), in MiB."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux

    def record(self, dist_info: Dist) -> dict[str, float | str]:
        """eval.json's fields: the peak over every rank (a collective: every rank must call it)."""
        peak = self.peak_mb()
        if dist_info.world > 1:
            t = torch.tensor([peak], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            peak = float(t.item())
        return {"peak_memory_mb": round(peak, 1), "peak_memory_kind": self.kind, "peak_memory_scope": self.scope}


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0); False where the system does not allow it."""
    try:
        _CLEAR_REFS.write_text(_RESET_PEAK_RSS)
        return True
    except OSError:
        return False
