"""analyze(): many models in one pass, planted copies, CKAResult files, torch.distributed sharding."""

import copy
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from timm.models.vision_transformer import VisionTransformer

from cka_split import CKAResult, MinibatchCKA, analyze
from vitsplit.backbones import Backbone
from vitsplit.errors import UserError
from vitsplit.progress import Progress, ProgressTask


def tiny_backbone(depth: int = 4, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=0, dynamic_img_size=True
    )
    return Backbone(vit, name="tiny", weights_source="random").eval()


def perturbed_from(bb: Backbone, k: int, seed: int = 1, scale: float = 0.5) -> Backbone:
    """A deep copy whose blocks k, k+1, ... get random perturbations; blocks < k are untouched."""
    out = copy.deepcopy(bb)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in out.vit.blocks[k:]:
            for p in block.parameters():
                p.add_(scale * p.abs().mean().clamp_min(0.02) * torch.randn(p.shape, generator=g))
    return out


def images(num_batches: int, batch: int = 6, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(num_batches)]


def test_planted_copy_same_layer_cka_is_one_below_k_and_less_from_k():
    k = 3
    a = tiny_backbone(depth=6)
    b = perturbed_from(a, k)
    res = analyze({"pretrained": a, "seg": b}, images(3), features="tokens")
    diag = torch.diagonal(res.matrix("pretrained", "seg"))
    assert torch.all((diag[:k] - 1).abs() < 1e-12)
    assert torch.all(diag[k:] < 1 - 1e-4)
    assert res.num_images == 18 and res.num_batches == 3
    assert res.layers == {"pretrained": list(range(6)), "seg": list(range(6))}
    torch.testing.assert_close(
        torch.diagonal(res.matrix("seg", "seg")), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_analyze_equals_accumulator_on_forward_layers_and_accepts_dict_batches():
    a, b = tiny_backbone(seed=0), tiny_backbone(seed=1)
    batches = images(2, batch=5)
    res = analyze(
        {"p": a, "q": b},
        [{"image": x, "index": i} for i, x in enumerate(batches)],
        layers=[1, 3],
        features="mean",
        unbiased=True,
    )
    acc = MinibatchCKA(unbiased=True)
    with torch.no_grad():
        for x in batches:
            fa, fb = a.forward_layers(x, [1, 3]), b.forward_layers(x, [1, 3])
            acc.update([fa[1][:, 1:].mean(1), fa[3][:, 1:].mean(1), fb[1][:, 1:].mean(1), fb[3][:, 1:].mean(1)])
    torch.testing.assert_close(res.full, acc.compute(), rtol=0, atol=1e-12)
    assert res.matrix("p", "q").shape == (2, 2) and res.labels() == ["p/1", "p/3", "q/1", "q/3"]
    assert a.training is False


def test_result_save_load_round_trip(tmp_path):
    res = analyze(
        {"pretrained": tiny_backbone(), "det": tiny_backbone(seed=2)},
        images(2),
        layers={"pretrained": [0, 2], "det": [1, 2, 3]},
        features="cls",
        unbiased=False,
    )
    path = res.save(tmp_path / "cka.npz")
    back = CKAResult.load(path)
    assert torch.equal(back.full, res.full) and back.full.dtype == torch.float64
    assert (back.models, back.layers, back.num_images, back.features, back.unbiased) == (
        ["pretrained", "det"],
        {"pretrained": [0, 2], "det": [1, 2, 3]},
        12,
        "cls",
        False,
    )
    assert torch.equal(back.matrix("det", "pretrained"), res.full[2:, :2])
    with np.load(path, allow_pickle=False) as z:  # plain arrays, no pickles
        assert z["full"].shape == (5, 5) and list(z["models"]) == ["pretrained", "det"]
    with pytest.raises(UserError, match="no model 'seg'"):
        back.matrix("seg", "det")
    torch.testing.assert_close(back.full_se, res.full_se, rtol=0, atol=0)
    assert back.se_batches == 2 and back.se("det", "pretrained").shape == (3, 2)
    assert torch.isfinite(back.se("det", "pretrained")).all() and float(back.se("det", "pretrained").max()) > 0
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(UserError, match="not a CKA result"):
        CKAResult.load(tmp_path / "bad.npz")


def test_format_1_file_without_se_still_loads_with_nan_se(tmp_path):
    res = analyze({"pretrained": tiny_backbone(), "seg": perturbed_from(tiny_backbone(), 2)}, images(3), layers=[0, 2])
    with np.load(res.save(tmp_path / "new.npz"), allow_pickle=False) as z:
        old = {k: z[k] for k in z.files if k not in ("batch_hsic", "full_se")}
    old["format_version"] = np.array(1, dtype=np.int64)
    np.savez(tmp_path / "old.npz", **old)
    back = CKAResult.load(tmp_path / "old.npz")
    assert torch.equal(back.full, res.full) and back.batch_hsic is None and back.se_batches == 0
    assert torch.isnan(back.se("pretrained", "seg")).all()


def test_analyze_se_equals_leave_one_batch_out_reruns():
    a = tiny_backbone(depth=4)
    models = {"pretrained": a, "seg": perturbed_from(a, 1)}
    batches = images(5)
    res = analyze(models, batches)
    loo = torch.stack([analyze(models, batches[:b] + batches[b + 1 :]).full for b in range(5)])
    ref = torch.sqrt(4 / 5 * ((loo - loo.mean(0)) ** 2).sum(0))
    torch.testing.assert_close(res.full_se, ref, rtol=0, atol=1e-10)
    assert float(res.se("pretrained", "seg")[3, 3]) > 1e-4


class CountingProgress(Progress):
    def __init__(self):
        self.advanced, self.totals = 0, []

    def task(self, description, total=None, completed=0):
        self.totals.append(total)
        outer = self

        class T(ProgressTask):
            def advance(self, n=1, **fields):
                outer.advanced += n

        return T()


def test_progress_and_user_errors():
    prog = CountingProgress()
    analyze({"p": tiny_backbone()}, images(3), layers=[0], progress=prog)
    assert prog.totals == [3] and prog.advanced == 3
    with pytest.raises(UserError, match="at least 4 examples"):
        analyze({"p": tiny_backbone()}, images(1, batch=3))
    with pytest.raises(UserError, match="no 'image'"):
        analyze({"p": tiny_backbone()}, [{"img": torch.zeros(4, 3, 32, 32)}])
    with pytest.raises(UserError, match="no minibatch"):
        analyze({"p": tiny_backbone()}, [])


# ------------------------------------------------------------------------- torch.distributed
def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        a = tiny_backbone(seed=0)
        b = perturbed_from(a, 2)
        res = analyze({"p": a, "q": b}, images(5), layers=[0, 2, 3])  # 5 minibatches: ranks get 3 and 2
        acc = MinibatchCKA()
        for i, x in enumerate(images(5)):
            if i % world == rank:
                acc.update([x, x[:, :2] ** 2, x.flip(0).roll(1, dims=1)])
        acc.all_reduce()
        torch.save(
            {
                "full": res.full,
                "se": res.full_se,
                "num_images": res.num_images,
                "acc": acc.compute(),
                "acc_se": acc.compute_se(),
                "num_examples": acc.num_examples,
                "num_batches": acc.num_batches,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_two_gloo_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a = tiny_backbone(seed=0)
    single = analyze({"p": a, "q": perturbed_from(a, 2)}, images(5), layers=[0, 2, 3])
    acc = MinibatchCKA()
    for x in images(5):
        acc.update([x, x[:, :2] ** 2, x.flip(0).roll(1, dims=1)])
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["full"], single.full, rtol=0, atol=1e-12)
        torch.testing.assert_close(got["acc"], acc.compute(), rtol=0, atol=1e-12)
        torch.testing.assert_close(got["se"], single.full_se, rtol=0, atol=1e-12)  # the jackknife SE too
        torch.testing.assert_close(got["acc_se"], acc.compute_se(), rtol=0, atol=1e-12)
        assert float(single.se("p", "q")[2, 2]) > 1e-4 and torch.isfinite(got["acc_se"]).all()
        assert got["num_images"] == 30 and got["num_examples"] == 30 and got["num_batches"] == 5
