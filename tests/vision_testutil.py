"""Torch reference of the LAVIS EVA-ViT-G structure and a difference helper, for the vision
parity tests.

Written from the LAVIS layout (parameter names = the eva_vit_g.pth keys): patch conv with
bias, class token, learned absolute positions, pre-LN blocks (eps 1e-6), qkv without bias plus
cat(q_bias, 0, v_bias), exact GELU, no final norm.
"""
import numpy as np
import torch


def max_diff(a, b) -> float:
  """Largest absolute difference, computed in float64."""
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


class TorchEvaAttention(torch.nn.Module):
  """LAVIS EVA attention: qkv without bias + cat(q_bias, 0, v_bias), scale head_dim**-0.5."""

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
    self.q_bias = torch.nn.Parameter(torch.randn(dim) * 0.1)
    self.v_bias = torch.nn.Parameter(torch.randn(dim) * 0.1)
    self.proj = torch.nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
    qkv = torch.nn.functional.linear(x, self.qkv.weight, bias)
    qkv = qkv.reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (c // self.heads) ** -0.5, qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)).softmax(-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TorchEvaMlp(torch.nn.Module):

  def __init__(self, dim, mlp):
    super().__init__()
    self.fc1 = torch.nn.Linear(dim, mlp)
    self.fc2 = torch.nn.Linear(mlp, dim)

  def forward(self, x):
    return self.fc2(torch.nn.functional.gelu(self.fc1(x)))  # exact (erf) GELU


class TorchEvaBlock(torch.nn.Module):
  """LAVIS EVA block: x + attn(norm1(x)); x + mlp(norm2(x)); LayerNorm eps 1e-6, no layer scale."""

  def __init__(self, dim, heads, mlp):
    super().__init__()
    self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6)
    self.attn = TorchEvaAttention(dim, heads)
    self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6)
    self.mlp = TorchEvaMlp(dim, mlp)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class TorchEva(torch.nn.Module):
  """Patch conv (bias) + cls + learned abs positions + blocks, no final norm; returns all
  block outputs. LAVIS-named parameters (state_dict keys = the eva_vit_g.pth layout)."""

  def __init__(self, dim=32, heads=4, mlp=80, depth=3, patch=4, image=16):
    super().__init__()
    self.patch_embed = torch.nn.Module()
    self.patch_embed.proj = torch.nn.Conv2d(3, dim, patch, patch)
    g = image // patch
    self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim))
    self.pos_embed = torch.nn.Parameter(torch.randn(1, 1 + g * g, dim) * 0.5)
    self.blocks = torch.nn.ModuleList([TorchEvaBlock(dim, heads, mlp) for _ in range(depth)])
    with torch.no_grad():
      for name, p in self.named_parameters():
        if "norm" in name:
          p.add_(0.1 * torch.randn_like(p))

  def forward(self, x_nchw):
    x = self.patch_embed.proj(x_nchw).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    outs = []
    for blk in self.blocks:
      x = blk(x)
      outs.append(x)
    return outs
