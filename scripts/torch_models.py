"""Small PyTorch models for the curve benchmark (scripts/bench_curves.py).

* :func:`resnet`: ResNet-18-like (BasicBlock) or ResNet-50-like (Bottleneck) networks whose
  batch-norm layers can be calibrated on data and then folded into the convolutions, so that
  the torch model and its ONNX export hold exactly the same weights;
* :class:`MiniLM`: a BERT-shaped encoder (MiniLM sizes by default) with attention-mask mean
  pooling, written by hand (no ``transformers``), random weights.

Importing this module imports torch; nothing else happens at import time.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ConvBN(nn.Module):
    """Convolution followed by batch norm; :meth:`fold` merges the norm into the conv."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(cout, momentum=None)  # cumulative statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    @torch.no_grad()
    def fold(self) -> None:
        bn = self.bn
        if not isinstance(bn, nn.BatchNorm2d):
            return
        assert bn.running_var is not None and bn.running_mean is not None
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv = self.conv
        fused = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            bias=True,
        ).to(conv.weight.device)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        assert fused.bias is not None
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        self.conv = fused
        self.bn = nn.Identity()


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.c1 = ConvBN(cin, width, 3, stride)
        self.c2 = ConvBN(width, cout, 3)
        self.down = ConvBN(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.down is None else self.down(x)
        y = torch.relu(self.c1(x))
        return torch.relu(self.c2(y) + skip)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.c1 = ConvBN(cin, width, 1)
        self.c2 = ConvBN(width, width, 3, stride)
        self.c3 = ConvBN(width, cout, 1)
        self.down = ConvBN(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.down is None else self.down(x)
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y))
        return torch.relu(self.c3(y) + skip)


class ResNet(nn.Module):
    """ImageNet-style ResNet (7x7/2 stem and max pool, four stages, global pool, fc)."""

    def __init__(
        self, block: type[BasicBlock | Bottleneck], depths: list[int], width: int, classes: int
    ) -> None:
        super().__init__()
        self.stem = ConvBN(3, width, 7, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        stages: list[nn.Module] = []
        cin = width
        for i, depth in enumerate(depths):
            planes = width * 2**i
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(block(cin, planes, stride))
                cin = planes * block.expansion
        self.blocks = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.stem(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(x.mean(dim=(2, 3), keepdim=True), 1))


def resnet(kind: str, width: int = 64, classes: int = 1000) -> ResNet:
    """``resnet18`` (BasicBlock, 2-2-2-2) or ``resnet50`` (Bottleneck, 3-4-6-3)."""
    if kind == "resnet18":
        return ResNet(BasicBlock, [2, 2, 2, 2], width, classes)
    if kind == "resnet50":
        return ResNet(Bottleneck, [3, 4, 6, 3], width, classes)
    raise ValueError(f"unknown ResNet kind {kind!r}")


@torch.no_grad()
def calibrate_and_fold(model: ResNet, images: torch.Tensor, batch_size: int, seed: int) -> None:
    """Give the random network realistic batch-norm statistics, then fold them into the convs.

    The norms' affine parameters are drawn at random (scale in [0.5, 1.5), small shift); their
    running statistics are the exact mean and variance over ``images`` (cumulative averaging);
    then every norm is folded, so the model is conv (+bias) only and exports without renames.
    The last norm of each residual branch gets a 5x smaller scale (the usual "small last
    gamma" initialisation), so activations do not double with every block.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.weight.copy_(0.5 + torch.rand(n, generator=generator))
            module.bias.copy_(0.1 * torch.randn(n, generator=generator))
            module.reset_running_stats()
    for module in model.modules():
        last = module.c2 if isinstance(module, BasicBlock) else None
        last = module.c3 if isinstance(module, Bottleneck) else last
        if last is not None:
            last.bn.weight.mul_(0.2)
    model.train()
    for start in range(0, len(images), batch_size):
        model(images[start : start + batch_size])
    model.eval()
    for module in model.modules():
        if isinstance(module, ConvBN):
            module.fold()


class EncoderLayer(nn.Module):
    """Post-norm BERT layer: self-attention, add & norm, GELU feed-forward, add & norm."""

    def __init__(self, hidden: int, heads: int, intermediate: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn_in = nn.Linear(hidden, intermediate)
        self.ffn_out = nn.Linear(intermediate, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-12)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        context = context.transpose(1, 2).reshape(b, s, h)
        x = self.norm1(x + self.attn_out(context))
        y = self.ffn_out(nn.functional.gelu(self.ffn_in(x)))
        return self.norm2(x + y)


class MiniLM(nn.Module):
    """BERT-shaped sentence encoder: embeddings, encoder layers, masked mean pooling, L2 norm.

    Inputs ``input_ids`` and ``attention_mask`` (int64, (batch, sequence)); output the
    (batch, hidden) embedding, as sentence-transformers' all-MiniLM-L6-v2 produces it.
    """

    def __init__(
        self,
        layers: int = 6,
        hidden: int = 384,
        heads: int = 12,
        intermediate: int = 1536,
        vocab: int = 30522,
        max_positions: int = 512,
    ) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(max_positions, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(
            EncoderLayer(hidden, heads, intermediate) for _ in range(layers)
        )
        for module in self.modules():  # BERT's initialisation
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.normal_(module.bias, std=0.02)  # random, so no two biases are equal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.norm(self.word(input_ids) + self.position(positions)[None])
        mask = attention_mask.to(x.dtype)
        mask_bias = (1.0 - mask[:, None, None, :]) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, mask_bias)
        summed = (x * mask[:, :, None]).sum(dim=1)
        pooled = summed / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)
