"""Operators: functional core plus module form (torchvision-ops style)."""

from .deform_conv import IMPLEMENTATIONS, DeformConv3x3, deform_conv2d_fast, set_deform_impl
from .imagenet import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMPLEMENTATIONS", "DeformConv3x3", "deform_conv2d_fast", "set_deform_impl", "IMAGENET_MEAN", "IMAGENET_STD"]
