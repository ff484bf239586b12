"""TransMIL (Shao et al., NeurIPS 2021): Nystrom-attention transformer with a pyramid position encoding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from nystrom_attention import NystromAttention
from torch import nn

from ubc_ocean.mil.base import MILModel
from ubc_ocean.mil.registry import register


def pad_to_square(tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Pad ``[B, N, C]`` patch tokens to ``side**2`` tokens, ``side = ceil(sqrt(N))``, by appending
    copies of the first tokens (cyclically, though ``side**2 - N <= N`` always holds); returns the
    padded tokens and ``side``."""
    n = tokens.shape[1]
    if n < 1:
        raise ValueError("cannot pad an empty token sequence")
    side = math.isqrt(n)
    if side * side < n:
        side += 1
    add = side * side - n
    if add == 0:
        return tokens, side
    index = torch.arange(add, device=tokens.device) % n
    return torch.cat([tokens, tokens[:, index]], dim=1), side


class TransLayer(nn.Module):
    """Pre-norm residual Nystrom self-attention: ``x + NystromAttention(LayerNorm(x))``; sequences of at most
    ``exact_up_to`` tokens (0: none) take :func:`exact_attention` with the same weights instead.

    NystromAttention zero-pads the sequence to a multiple of its landmark count; unmasked, those zero
    tokens join every softmax and dilute the attention of bags smaller than a few landmark counts (TMAs:
    tens of tiles), which the reference code does. ``mask_padding`` hands the library a mask so that
    only real tokens attend and are attended: below the landmark count the result is then close to exact
    softmax attention."""

    def __init__(self, dim: int, heads: int = 8, num_landmarks: int | None = None, dropout: float = 0.1,
                 mask_padding: bool = True, exact_up_to: int = 0) -> None:
        super().__init__()
        self.mask_padding = mask_padding
        self.exact_up_to = exact_up_to
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(
            dim=dim,
            dim_head=dim // heads,
            heads=heads,
            num_landmarks=num_landmarks if num_landmarks is not None else dim // 2,
            pinv_iterations=6,
            residual=True,
            dropout=dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.exact_up_to and x.shape[1] <= self.exact_up_to:
            return x + exact_attention(self.attention, h)
        mask = None
        if self.mask_padding and x.shape[1] % self.attention.num_landmarks:  # the library will pad
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return x + self.attention(h, mask=mask)


def exact_attention(attention: NystromAttention, x: torch.Tensor) -> torch.Tensor:
    """Full softmax self-attention with a ``NystromAttention``'s own weights: the same query, key and value
    projections, heads, scale, depthwise value-residual convolution and output projection, without the
    landmark approximation (which Nystrom attention converges to). ``x`` is ``[B, N, dim]``."""
    b, n, _ = x.shape
    q, k, v = (t.reshape(b, n, attention.heads, -1).transpose(1, 2) for t in attention.to_qkv(x).chunk(3, dim=-1))
    out = ((q * attention.scale) @ k.transpose(-1, -2)).softmax(dim=-1) @ v
    if attention.residual:
        out = out + attention.res_conv(v)
    return attention.to_out(out.transpose(1, 2).reshape(b, n, -1))


class PPEG(nn.Module):
    """Pyramid position encoding generator: identity plus depthwise 7x7, 5x5 and 3x3 convolutions over
    the patch tokens laid out on a ``side x side`` grid; the leading cls token passes through unchanged.

    The three convolutions and the identity run as one depthwise 7x7 convolution whose kernel is their sum
    (the 5x5 and 3x3 kernels zero-padded to 7x7, the identity a 1 at the centre; same padding, so the same
    result up to float rounding): one pass over the grid forward and backward instead of three. The three
    ``Conv2d`` modules keep their parameters (checkpoints are unchanged) and their gradients."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.conv5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        identity = torch.zeros(1, 1, 7, 7)
        identity[..., 3, 3] = 1.0
        self.register_buffer("identity", identity, persistent=False)

    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The one depthwise 7x7 kernel ``[dim, 1, 7, 7]`` and bias ``[dim]`` equal to identity + the three."""
        weight = (self.conv7.weight + F.pad(self.conv5.weight, (1, 1, 1, 1)) + F.pad(self.conv3.weight, (2, 2, 2, 2))
                  + self.identity.to(self.conv7.weight.dtype))
        return weight, self.conv7.bias + self.conv5.bias + self.conv3.bias

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, n, c = x.shape
        if n != side * side + 1:
            raise ValueError(f"PPEG expects 1 cls + {side}x{side} patch tokens, got {n} tokens")
        cls_token, patches = x[:, :1], x[:, 1:]
        grid = patches.transpose(1, 2).reshape(b, c, side, side)
        weight, bias = self.fused_kernel()
        grid = F.conv2d(grid, weight, bias, padding=3, groups=c)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)


@register("transmil")
class TransMIL(MILModel):
    """``Linear+ReLU`` projection; pad to a square; prepend cls; TransLayer; PPEG; TransLayer; LayerNorm;
    ``Linear`` head on the cls token. ``embedding`` is the normalised cls token. No ``attention`` output.

    Nystrom attention keeps memory linear in the bag size (``N x num_landmarks`` similarity blocks).
    Defaults (hidden 512, 8 heads of 64, 256 landmarks, dropout 0.1) follow the paper;
    ``mask_padding=False`` reproduces the reference code's unmasked landmark padding (see TransLayer).
    Sequences of at most ``exact_attention_up_to`` tokens (default: the landmark count; 0: never) take
    exact softmax attention with the same weights: there Nystrom's landmarks are the tokens themselves or
    averages of two, it costs more than exact attention, and averaged landmarks blur a single informative
    tile, which a bag of tens of tiles (a TMA) may hinge on.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 512,
        heads: int = 8,
        num_landmarks: int | None = None,
        dropout: float = 0.1,
        mask_padding: bool = True,
        exact_attention_up_to: int | None = None,
    ) -> None:
        if heads < 1 or hidden_dim % heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be a positive multiple of heads ({heads})")
        landmarks = num_landmarks if num_landmarks is not None else hidden_dim // 2
        if landmarks < 1:
            raise ValueError(f"num_landmarks must be positive, got {landmarks}")
        exact = landmarks if exact_attention_up_to is None else int(exact_attention_up_to)
        if exact < 0:
            raise ValueError(f"exact_attention_up_to must be >= 0 (0: always Nystrom), got {exact}")
        super().__init__(
            in_dim,
            n_classes,
            options={"hidden_dim": hidden_dim, "heads": heads, "num_landmarks": landmarks, "dropout": dropout,
                     "mask_padding": bool(mask_padding), "exact_attention_up_to": exact},
            embedding_dim=hidden_dim,
        )
        self.instance_encoder = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim))
        self.layer1 = TransLayer(hidden_dim, heads, landmarks, dropout, mask_padding, exact)
        self.ppeg = PPEG(hidden_dim)
        self.layer2 = TransLayer(hidden_dim, heads, landmarks, dropout, mask_padding, exact)
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward_bag(self, bag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.instance_encoder(bag)  # [1, N, hidden]
        h, side = pad_to_square(h)
        x = torch.cat([self.cls_token.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
        x = self.layer1(x)
        x = self.ppeg(x, side)
        x = self.layer2(x)
        embedding = self.norm(x)[:, 0]  # [1, hidden]
        return {"logits": self.classifier(embedding), "embedding": embedding}
