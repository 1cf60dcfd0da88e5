"""The trainable parts: byte-level encoder + latent pooler, and one adapter per frozen LLM."""

from __future__ import annotations

import torch
from torch import nn

PAD_BYTE = 256  # bytes are 0..255; one extra id for padding


class ByteEncoder(nn.Module):
    """UTF-8 bytes -> Transformer -> latent pooler (learned queries, cross-attention) -> Z in R^{M x d_z}."""

    def __init__(self, latent_len: int, d_z: int, d_model: int = 64, layers: int = 2, heads: int = 4,
                 max_bytes: int = 512, dropout: float = 0.1) -> None:  # fmt: skip
        super().__init__()
        self.max_bytes = max_bytes
        self.embed = nn.Embedding(PAD_BYTE + 1, d_model, padding_idx=PAD_BYTE)
        self.position = nn.Parameter(torch.randn(max_bytes, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.queries = nn.Parameter(torch.randn(latent_len, d_model) * 0.02)
        self.pool = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.out = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, d_z))

    def forward(self, byte_ids: torch.Tensor) -> torch.Tensor:
        byte_ids = byte_ids[:, : self.max_bytes]
        pad = byte_ids == PAD_BYTE
        h = self.embed(byte_ids) + self.position[: byte_ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=pad)
        queries = self.queries.unsqueeze(0).expand(byte_ids.shape[0], -1, -1)
        z, _ = self.pool(queries, h, h, key_padding_mask=pad, need_weights=False)
        return self.out(z)


class Adapter(nn.Module):
    """d_z -> d_model: MLP with a residual path, LayerNorm and a learnable scale; output rescaled to the LLM's
    embedding RMS so the prefix looks like ordinary token embeddings to the frozen model."""

    def __init__(self, d_z: int, d_model: int, embed_rms: float, hidden: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_z, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.residual = nn.Linear(d_z, d_model, bias=False)
        self.norm = nn.LayerNorm(d_model)
        self.scale = nn.Parameter(torch.ones(()))
        self.register_buffer("embed_rms", torch.tensor(float(embed_rms)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.mlp(z) + self.residual(z))
        rms = h.pow(2).mean(dim=-1, keepdim=True).add(1e-6).sqrt()
        return self.scale * h / rms * self.embed_rms
