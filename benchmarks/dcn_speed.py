"""Deformable conv forward+backward: vitsplit's grid_sample+matmul path vs torchvision.ops.deform_conv2d.

Shapes are ViT-Split's (the 3x3 DCN C -> C on the patch grid; S: C=384, 32x32 maps at crop 448 or
37x37 at crop 518). Offsets are random (std 2 px) so sampling is genuinely deformable. Prints the
time per fwd+bwd of each, their ratio, and the largest output difference; then one whole ViT-Split-S
training step (forward + backward, 150 classes, random DINOv2-S weights) with each implementation.

    python benchmarks/dcn_speed.py [--channels 384] [--sizes 32 37] [--batches 2 8] [--reps 3]
                                   [--step-batch 2] [--step-crop 224] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.ops import deform_conv2d

from vitsplit.ops.deform_conv import deform_conv2d_fast


def _time(fn, reps: int) -> float:
    """Fastest seconds per call over ``reps`` calls after one warm-up (on a shared CPU the minimum is the
    least disturbed run, as ``timeit`` recommends)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 37])
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--step-batch", type=int, default=2)
    ap.add_argument("--step-crop", type=int, default=224)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    c = args.channels
    print(f"device {dev}, threads {torch.get_num_threads()}, C={c}; time per forward+backward (ms)")
    print(f"{'batch':>5} {'map':>7} {'fast':>9} {'torchvision':>12} {'speed-up':>9} {'max |diff|':>11}")
    for b in args.batches:
        for s in args.sizes:
            torch.manual_seed(0)
            x = torch.randn(b, c, s, s, device=dev, requires_grad=True)
            off = (torch.randn(b, 18, s, s, device=dev) * 2).requires_grad_()
            w = (torch.randn(c, c, 3, 3, device=dev) / (9 * c) ** 0.5).requires_grad_()
            g = torch.randn(b, c, s, s, device=dev)

            def step(f, x=x, off=off, w=w, g=g):
                def run():
                    x.grad = off.grad = w.grad = None
                    f(x, off, w).backward(g)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()

                return run

            fast = step(lambda a, o, k: deform_conv2d_fast(a, o, k, padding=1))
            ref = step(lambda a, o, k: deform_conv2d(a, o, k, padding=(1, 1)))
            t_fast, t_ref = _time(fast, args.reps), _time(ref, args.reps)
            with torch.no_grad():
                diff = (
                    (deform_conv2d_fast(x, off, w, padding=1) - deform_conv2d(x, off, w, padding=(1, 1)))
                    .abs()
                    .max()
                    .item()
                )
            print(
                f"{b:>5} {f'{s}x{s}':>7} {t_fast * 1e3:>9.1f} {t_ref * 1e3:>12.1f} {t_ref / t_fast:>8.2f}x "
                f"{diff:>11.2e}"
            )
    if args.step_batch > 0:
        model_step(args.step_batch, args.step_crop, args.reps, dev)


def model_step(batch: int, crop: int, reps: int, device: torch.device) -> None:
    """Time one ViT-Split-S seg training step (loss forward + backward) with each deformable impl."""
    from vitsplit import build_backbone
    from vitsplit.model import ViTSplit

    model = ViTSplit(build_backbone("dinov2_vits14", "random", seed=0), 3, [2, 5, 8, 11], "seg", 150).to(device).train()
    for blk in (model.split.prior_head.deform, model.split.fusion.deform):  # trained-like offsets
        torch.nn.init.normal_(blk.offset.weight, std=1e-2)
    torch.manual_seed(0)
    data = {
        "image": torch.randn(batch, 3, crop, crop, device=device),
        "seg": torch.randint(0, 150, (batch, crop, crop), device=device),
    }

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model.loss(data)["loss"].backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {}
    for impl in ("fast", "torchvision"):
        model.set_deform_impl(impl)
        times[impl] = _time(step, reps)
    print(
        f"ViT-Split-S train step (batch {batch}, crop {crop}, 150 classes): fast {times['fast'] * 1e3:.0f} ms, "
        f"torchvision {times['torchvision'] * 1e3:.0f} ms, speed-up {times['torchvision'] / times['fast']:.2f}x"
    )


if __name__ == "__main__":
    main()
