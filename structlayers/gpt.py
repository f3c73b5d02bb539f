"""A small GPT in the style of nanoGPT, written so that `sl.structurize` can swap its layers
(used by examples/structurize_gpt.py and the compute-efficiency benchmark).

Every projection is its own nn.Linear with a readable name: attn.q, attn.k, attn.v, attn.proj,
mlp.fc and mlp.proj in each block, and lm_head (tied to the token embedding, as in nanoGPT,
unless tie_weights=False).

muP (Tensor Programs V) changes two things besides init and LRs (sl.mup): attention logits are
scaled by 1/head_dim instead of 1/sqrt(head_dim), since q and k become correlated during
training and q.k then grows like head_dim (`mup_base_head_dim`: the scale is
sqrt(base) / head_dim, the usual 1/sqrt(head_dim) at the base width), and the readout must not
share its weight with the embedding (an embedding is vector-like, the readout is not).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# every projection inside a block (not lm_head): the layers `sl.structurize(model, spec,
# include=BLOCK_PROJECTIONS)` swaps
BLOCK_PROJECTIONS = r"(mlp\.(fc|proj)|attn\.(q|k|v|proj))$"


@dataclass
class GPTConfig:
    vocab_size: int = 128
    block_size: int = 64  # the longest context
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    tie_weights: bool = True  # lm_head shares the token embedding's weight
    mup_base_head_dim: int | None = None  # None: 1/sqrt(head_dim) attention; else muP's scale


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd={config.n_embd} must be a multiple of n_head={config.n_head}")
        d = config.n_embd
        # separate q, k, v (not one fused c_attn) so each can get its own structure
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.n_head, self.dropout = config.n_head, config.dropout
        head_dim = d // config.n_head
        base = config.mup_base_head_dim
        if base is not None and (isinstance(base, bool) or not isinstance(base, int) or base < 1):
            raise ValueError(f"mup_base_head_dim must be None or a positive int, got {base!r}")
        self.scale = 1 / math.sqrt(head_dim) if base is None else math.sqrt(base) / head_dim
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        """x: (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        """x: (B, T, C) -> (B, T, C)."""
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(config.n_embd), CausalSelfAttention(config)
        self.ln_2, self.mlp = nn.LayerNorm(config.n_embd), MLP(config)

    def forward(self, x):
        """x: (B, T, C) -> (B, T, C), pre-norm residual."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        """idx: (B, T) token ids -> logits (B, T, vocab_size), and the mean cross-entropy
        against targets (B, T) if given (else None)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} > block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss
