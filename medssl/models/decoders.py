"""Segmentation networks around medssl's encoders: ViT -> UNETR, ResNet -> a UNet decoder over its stages.

Both are assembled from MONAI's UNETR blocks (UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock, UnetOutBlock)
around the *same* encoder module pretraining saved (`self.encoder`), so an encoder file loads into
`net.encoder` with no key surgery (load_pretrained_encoder checks that every encoder key is used and that
only decoder keys are left to train). MONAI's own UNETR class cannot be used as is: it builds its own ViT
(other key names, patch size fixed at 16, 12 layers), while medssl's ViT has its own names and any depth.

Shapes: (B, C, *spatial) -> (B, n_classes, *spatial) logits; spatial_dims 2 or 3.
"""
from __future__ import annotations

import math

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from medssl.errors import ConfigError, TrainingError
from medssl.models.encoders import clean_state_dict
from medssl.models.vit import ViTEncoder

NORM = "instance"
RESNET_STRIDE = 32   # stride-2 stem, max-pool, then three stride-2 stages


def up_block(dims: int, cin: int, cout: int) -> UnetrUpBlock:
    """Transposed conv x2, concatenate the skip (cout channels), residual conv block."""
    return UnetrUpBlock(dims, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=NORM, res_block=True)


def _check_divisible(size: list[int], stride: int, what: str) -> None:
    bad = [s for s in size if s % stride]
    if bad:
        raise ConfigError(f"segmentation patch {list(size)} is not divisible by {stride} ({what})",
                          where="segmentation.patch",
                          fix=f"choose a patch whose every edge is a multiple of {stride}")


class ViTUNETR(nn.Module):
    """UNETR (Hatamizadeh et al. 2022): skips from intermediate transformer layers, projected back to
    image resolution by transposed convolutions. Generalised to any power-of-two patch (log2(patch)
    upsamplings) and any depth; with 12 layers and patch 16 it uses layers 3, 6, 9 as MONAI's UNETR does."""

    def __init__(self, encoder: ViTEncoder, n_classes: int, feature_size: int = 16):
        super().__init__()
        dims, patch, hidden = encoder.spatial_dims, encoder.patch_size, encoder.out_features
        levels = int(round(math.log2(patch)))
        if 2 ** levels != patch or levels < 1:
            raise ConfigError(f"UNETR needs a power-of-two ViT patch size, got {patch}", where="encoder.patch_size",
                              fix="pretrain the ViT with patch_size 8 or 16")
        self.encoder, self.levels, self.grid = encoder, levels, list(encoder.grid)
        depth = len(encoder.blocks)
        # which block's output feeds skip level j (1/2^j resolution): deeper layers for coarser levels
        self.taps = [min(depth - 1, j * depth // levels) for j in range(1, levels)]
        self.stem = UnetrBasicBlock(dims, encoder.in_channels, feature_size, 3, 1, NORM, res_block=True)
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(dims, hidden, feature_size * 2 ** j, num_layer=levels - j - 1, kernel_size=3, stride=1,
                           upsample_kernel_size=2, norm_name=NORM, conv_block=True, res_block=True)
            for j in range(1, levels))
        self.ups = nn.ModuleList(up_block(dims, hidden if j == levels - 1 else feature_size * 2 ** (j + 1),
                                     feature_size * 2 ** j) for j in range(levels - 1, -1, -1))
        self.head = UnetOutBlock(dims, feature_size, n_classes)

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, D, *grid)."""
        b, _, d = tokens.shape
        return tokens.transpose(1, 2).reshape(b, d, *self.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if list(x.shape[2:]) != [g * self.encoder.patch_size for g in self.grid]:
            raise TrainingError(f"UNETR input {tuple(x.shape[2:])} differs from the encoder's image size "
                                f"{[g * self.encoder.patch_size for g in self.grid]}", where="segmentation.patch")
        tokens, hidden = self.encoder.patch_embed(x), []                     # (B, L, D)
        for block in self.encoder.blocks:
            tokens = block(tokens)
            hidden.append(tokens)
        skips = [self.stem(x)] + [up(self._grid(hidden[t])) for up, t in zip(self.skips, self.taps)]
        out = self._grid(self.encoder.norm(tokens))                         # (B, D, *grid)
        for up, skip in zip(self.ups, reversed(skips)):
            out = up(out, skip)
        return self.head(out)


class ResNetUNet(nn.Module):
    """UNet decoder over a MONAI ResNet's stages: skips at 1/1 (a conv block on the input), 1/2 (stem),
    1/4, 1/8, 1/16 (layers 1-3); the bottom is layer 4 at 1/32. Each skip keeps its own channel count."""

    def __init__(self, encoder: nn.Module, n_classes: int, feature_size: int = 16, spatial_dims: int = 3,
                 in_channels: int = 1):
        super().__init__()
        self.encoder = encoder
        widths = resnet_widths(encoder)                                        # stem, layer1..4
        self.stem = UnetrBasicBlock(spatial_dims, in_channels, feature_size, 3, 1, NORM, res_block=True)
        skips = [feature_size] + widths[:-1]                                   # 1/1, 1/2, 1/4, 1/8, 1/16
        ins = [widths[-1]] + skips[:0:-1]
        self.ups = nn.ModuleList(up_block(spatial_dims, cin, cout) for cin, cout in zip(ins, skips[::-1]))
        self.head = UnetOutBlock(spatial_dims, feature_size, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_divisible(list(x.shape[2:]), RESNET_STRIDE, "the ResNet encoder halves it five times")
        e = self.encoder
        stem = e.act(e.bn1(e.conv1(x)))                                       # (B, C0, S/2)
        feats = [self.stem(x), stem]
        h = e.maxpool(stem)
        for layer in (e.layer1, e.layer2, e.layer3):
            h = layer(h)
            feats.append(h)                                                    # 1/4, 1/8, 1/16
        out = e.layer4(h)                                                      # (B, C4, S/32)
        for up, skip in zip(self.ups, reversed(feats)):
            out = up(out, skip)
        return self.head(out)


def resnet_widths(encoder: nn.Module) -> list[int]:
    """Output channels of a MONAI ResNet's stem and layer1-4 (the skips a decoder over its stages gets)."""
    def out_channels(stage: nn.Sequential) -> int:
        last = stage[-1]
        return (getattr(last, "conv3", None) or last.conv2).out_channels   # bottleneck or basic block
    return [encoder.conv1.out_channels] + [out_channels(s) for s in (encoder.layer1, encoder.layer2,
                                                                      encoder.layer3, encoder.layer4)]


def build_segmenter(encoder: nn.Module, n_classes: int, spatial_dims: int, in_channels: int = 1,
                    feature_size: int = 16) -> nn.Module:
    """The segmentation network for an encoder built by medssl.models.encoders.build_encoder."""
    if isinstance(encoder, ViTEncoder):
        return ViTUNETR(encoder, n_classes, feature_size)
    if hasattr(encoder, "layer4"):
        return ResNetUNet(encoder, n_classes, feature_size, spatial_dims, in_channels)
    raise ConfigError(f"no segmentation decoder for encoder {type(encoder).__name__}", where="encoder.name",
                      fix="use a resnet* or vit encoder")


def load_pretrained_encoder(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> dict[str, list[str]]:
    """Load encoder weights into `model.encoder` by name, unchanged. Returns {"missing", "unexpected"} of the
    whole network: missing must be decoder keys only (they train from scratch), unexpected must be empty;
    anything else (an encoder key absent, a shape mismatch) is a TrainingError naming the keys."""
    prefixed = {f"encoder.{k}": v for k, v in clean_state_dict(state).items()}
    own = model.state_dict()
    shapes = [k for k in prefixed if k in own and own[k].shape != prefixed[k].shape]
    result = model.load_state_dict({k: v for k, v in prefixed.items() if k not in shapes}, strict=False)
    missing, unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
    encoder_missing = [k for k in missing if k.startswith("encoder.")]
    if encoder_missing or unexpected or shapes:
        raise TrainingError(f"encoder weights do not fit the segmentation network's encoder: missing "
                            f"{encoder_missing[:6]}, unexpected {unexpected[:6]}, shape mismatches {shapes[:6]}",
                            where=where, fix="segment with the encoder settings and image size used in pretraining")
    return {"missing": missing, "unexpected": unexpected}
