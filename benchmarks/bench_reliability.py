"""What the reliability checks of issue 15 cost, on the Garg et al. standard model (9.5M parameters).

    OMP_NUM_THREADS=1 python benchmarks/bench_reliability.py

- the finite-weights check after every optimizer step (``NonFiniteLossGuard.on_step_end``): a sum
  per tensor, against ``torch.isfinite`` per tensor (what the exact check would cost every step);
- the checkpoint manifest (``checkpoints.write_manifest``): sha256 of a real checkpoint of that
  model (weights, Adam state, scheduler, RNG), and its check at resume.
Prints the minimum and median of repeats (the machine may be shared).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch


def _time(fn, repeats: int = 7) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    from icl_conml import ICLConfig, ICLModel
    from icl_conml.runs.checkpoints import check_checkpoint, write_manifest

    model = ICLModel(ICLConfig(n_dims=20, n_positions=41, n_embd=256, n_layer=12, n_head=8))
    tensors = [p.detach() for p in model.parameters()]
    print(f"model: {sum(t.numel() for t in tensors):,} parameters in {len(tensors)} tensors")

    def by_sum() -> bool:
        return bool(torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in tensors])).all())

    def by_isfinite() -> bool:
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    for name, fn in (("finite check, sums (used)", by_sum), ("finite check, isfinite", by_isfinite)):
        low, mid = _time(fn)
        print(f"{name}: min {low * 1e3:.1f} ms, median {mid * 1e3:.1f} ms per step")

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "checkpoint-1"
        model.save_pretrained(checkpoint)
        optimizer = torch.optim.AdamW(model.parameters())
        model(torch.randn(2, 41, 20), torch.randn(2, 41)).loss.backward()
        optimizer.step()
        torch.save(optimizer.state_dict(), checkpoint / "optimizer.pt")
        torch.save({"last_epoch": 1}, checkpoint / "scheduler.pt")
        (checkpoint / "trainer_state.json").write_text('{"global_step": 1}')
        size = sum(p.stat().st_size for p in checkpoint.iterdir())
        low, mid = _time(lambda: write_manifest(checkpoint), repeats=5)
        print(f"manifest of a {size / 1e6:.0f} MB checkpoint: min {low:.2f} s, median {mid:.2f} s")
        low, mid = _time(lambda: check_checkpoint(checkpoint), repeats=5)
        print(f"its check at resume: min {low:.2f} s, median {mid:.2f} s")


if __name__ == "__main__":
    main()
