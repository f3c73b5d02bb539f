"""The small GPT: attention scale (standard vs muP) against a hand-written attention, weight tying."""

import math

import pytest
import torch

from structlayers.gpt import GPT, CausalSelfAttention, GPTConfig


def reference_attention(attn: CausalSelfAttention, x: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal multi-head attention written out: softmax(q k^T * scale, masked) v, then proj."""
    B, T, C = x.shape
    q, k, v = (lin(x).view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)
               for lin in (attn.q, attn.k, attn.v))
    logits = (q @ k.transpose(-1, -2) * scale).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(),
                                                          -math.inf)
    return attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("base, scale", [(None, 1 / math.sqrt(8)), (8, 1 / math.sqrt(8)),
                                         (2, math.sqrt(2) / 8)])
def test_attention_scale(base, scale):
    """head_dim 8: 1/sqrt(8) by default and at the muP base head dim; sqrt(base)/8 otherwise."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(GPTConfig(n_embd=32, n_head=4, mup_base_head_dim=base)).double()
    with torch.no_grad():
        attn.q.weight.mul_(4.0)  # logits large enough that the scale matters
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(attn(x), reference_attention(attn, x, scale))
    other = reference_attention(attn, x, 2 * scale)
    assert (attn(x) - other).abs().max() > 1e-3


@pytest.mark.parametrize("base", [0, -4, 2.5, True])
def test_bad_mup_base_head_dim(base):
    with pytest.raises(ValueError, match="mup_base_head_dim"):
        CausalSelfAttention(GPTConfig(n_embd=32, n_head=4, mup_base_head_dim=base))


def test_weight_tying_is_optional():
    tied, untied = GPT(GPTConfig()), GPT(GPTConfig(tie_weights=False))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + 128 * 64
