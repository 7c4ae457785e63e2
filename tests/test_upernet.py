"""UperNet decode head + auxiliary FCN head (mmseg 0.20's UPerHead/FCNHead as the published configs use them)."""

import torch
import torch.nn.functional as F

from vitsplit.model.upernet import AUX_LOSS_WEIGHT, FCNHead, UPerHead, UperNetSegHead


def conv_bn(cin, cout, k):
    """Parameters of mmcv's ConvModule(cin, cout, k) with a norm: conv without bias + BN (weight, bias)."""
    return cin * cout * k * k + 2 * cout


def upernet_params(c, ch=512, classes=150, scales=4):
    ppm = scales * conv_bn(c, ch, 1)
    bottleneck = conv_bn(c + scales * ch, ch, 3)
    lateral = 3 * conv_bn(c, ch, 1)
    fpn = 3 * conv_bn(ch, ch, 3)
    fuse = conv_bn(4 * ch, ch, 3)
    return ppm + bottleneck + lateral + fpn + fuse + ch * classes + classes


def test_parameter_counts_follow_the_mmseg_layer_list():
    for c in (384, 768, 1024):
        head = UperNetSegHead([c] * 4, 150)
        assert sum(p.numel() for p in head.decode.parameters()) == upernet_params(c)
        assert sum(p.numel() for p in head.aux.parameters()) == conv_bn(c, 256, 3) + 256 * 150 + 150
    # the published DINOv2-B + UperNet head: 32,332,950 + 1,808,534 auxiliary
    head = UperNetSegHead([768] * 4, 150)
    assert sum(p.numel() for p in head.parameters()) == 32_332_950 + 1_808_534


def test_forward_shapes_and_top_down_path():
    torch.manual_seed(0)
    head = UPerHead([8, 8, 8, 8], num_classes=5, channels=16).eval()
    feats = [torch.randn(2, 8, 32 // 2**i, 24 // 2**i) for i in range(4)]
    with torch.no_grad():
        out = head(feats)
    assert out.shape == (2, 5, 32, 24)
    # the coarsest map reaches the output through the PPM and the top-down path: changing it changes the logits
    feats2 = feats[:3] + [feats[3] + 1.0]
    with torch.no_grad():
        assert float((head(feats2) - out).abs().max()) > 1e-4
    aux = FCNHead(8, 5, channels=4).eval()
    assert aux(feats[2]).shape == (2, 5, 8, 6)


def test_loss_is_decode_plus_weighted_auxiliary_cross_entropy():
    torch.manual_seed(0)
    head = UperNetSegHead([8] * 4, 3, channels=16, aux_channels=8).eval()  # eval: no dropout, so calls agree
    for conv in (head.decode.cls[1], head.aux.cls[1]):
        torch.nn.init.normal_(conv.weight, std=1.0)  # away from the near-uniform init
    feats = [torch.randn(2, 8, 16 // 2**i, 16 // 2**i) for i in range(4)]
    label = torch.randint(0, 3, (2, 64, 64))
    label[0, :8] = 255
    parts = head.loss(feats, label)

    def ce(logits):  # mmseg 0.20: mean over all pixels, ignored ones counting as 0
        logits = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, label, ignore_index=255, reduction="sum") / label.numel()

    d, a = ce(head.decode(feats)), ce(head.aux(feats[2]))
    assert torch.allclose(parts["loss_ce"], d) and torch.allclose(parts["loss_aux"], a)
    assert torch.allclose(parts["loss"], d + AUX_LOSS_WEIGHT * a)
    assert float((d - a).detach().abs()) > 1e-3  # the two heads are distinct
    assert head(feats, (64, 64)).shape == (2, 3, 64, 64)
