"""The C++ paged decode kernel against the PyTorch reference on random paged data."""

import pytest
import torch

from pagedserve.model.attention import AttentionMetadata, CppCpuPagedAttention, TorchPagedAttention


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (4, 4, 32, 8), (8, 2, 128, 4), (6, 1, 16, 1)])
def test_cpp_decode_matches_torch(heads, kv_heads, head_dim, block_size):
    g = torch.Generator().manual_seed(0)
    n = 7
    lens = torch.tensor([1, 5, 17, 33, 64, 2, 100], dtype=torch.long)
    max_blocks = int(-(-lens.max() // block_size))
    num_blocks = max_blocks * 2
    # Scattered, overlapping block tables (shared blocks are fine for attention).
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.stack([perm.roll(i * 3)[:max_blocks] for i in range(n)]).contiguous()
    kv = torch.randn(2, num_blocks, kv_heads, block_size, head_dim, generator=g)
    q = torch.randn(n, heads, head_dim, generator=g)
    meta = AttentionMetadata(slot_blocks=torch.zeros(0, dtype=torch.long), slot_offsets=torch.zeros(0, dtype=torch.long), num_decodes=n,
                             decode_block_tables=tables, decode_context_lens=lens,
                             decode_max_context=int(lens.max()), prefills=[], block_size=block_size)
    scale = head_dim**-0.5
    ref = TorchPagedAttention._decode(q, kv[0], kv[1], meta, scale)
    out = CppCpuPagedAttention()._decode(q, kv[0], kv[1], meta, scale)
    assert (out - ref).abs().max().item() < 1e-5
