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


@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("n,k", [(960, 576), (49152 // 64 + 3, 576), (576, 1536), (13, 8)])
def test_cpp_small_m_linear_matches_torch(m, n, k):
    """The decode-sized linear kernel agrees with F.linear for every row count it takes, including
    output sizes that are not a multiple of its register tile, and with a bias via Linear."""
    from pagedserve.model import cpu_kernels
    from pagedserve.model.llama import Linear, use_small_m_kernel

    ops = cpu_kernels.load(required=True)
    assert ops.linear_small_m_supported()
    g = torch.Generator().manual_seed(m * 1000 + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    torch.testing.assert_close(ops.linear_small_m(x, w), torch.nn.functional.linear(x, w), rtol=1e-4, atol=1e-4)
    lin = Linear(k, n, bias=True)
    ref = lin(x)
    assert use_small_m_kernel(lin, ops.linear_small_m) == 1
    torch.testing.assert_close(lin(x), ref, rtol=1e-4, atol=1e-4)
    big = torch.randn(9, k, generator=g)  # more rows than the kernel takes: the PyTorch path
    torch.testing.assert_close(lin(big), torch.nn.functional.linear(big, lin.weight, lin.bias))
    with pytest.raises(RuntimeError, match="M <= 8"):
        ops.linear_small_m(big, w)
