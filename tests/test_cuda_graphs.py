"""Decode steps through the CUDA-graph runner (engine/cuda_graphs.py, issue 27), checked here
without a GPU: the same static buffers, padding and launch shapes a captured graph replays, run
eagerly with the Triton kernels in the interpreter. The capture itself needs a GPU
(scripts/check_cuda.py: replay == eager there)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedserve.config import EngineConfig
from pagedserve.engine.cuda_graphs import graphs_unsupported


def capture_sizes(given, max_num_seqs):
    return EngineConfig(cuda_graph_sizes=given, max_num_seqs=max_num_seqs).resolve_cuda_graph_sizes()


def test_capture_sizes_follow_vllms_flag():
    assert capture_sizes(None, 20) == [1, 2, 4, 8, 16]
    assert capture_sizes(None, 1000)[-1] == 512 and len(capture_sizes(None, 1000)) == 3 + 64
    assert capture_sizes([32], 256) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes([3, 1, 5, 3], 256) == [1, 3, 5]
    assert capture_sizes([1, 2, 300], 256) == [1, 2]  # no decode step is larger than --max-num-seqs
    with pytest.raises(ValueError, match="positive"):
        capture_sizes([0, 4], 256)


def _llm(tiny_dirs, **kw):
    from pagedserve import LLM

    return LLM(str(tiny_dirs["llama3"]), dtype="float32", attention_backend="triton", max_model_len=256,
               kv_cache_memory=8 << 20, max_num_batched_tokens=32, **kw)


def _graphs(runner, sizes):
    return runner.use_decode_graphs(sizes, capture=False)


def test_a_padded_replay_computes_the_eager_step_and_writes_only_real_slots(tiny_dirs):
    """Three decodes replayed at size 4: the same hidden states as the eager step of three, and
    the padding row's K/V goes nowhere (PAD_SLOT): every cache byte but the three slots unchanged."""
    from pagedserve.model.attention import AttentionMetadata

    llm = _llm(tiny_dirs)
    runner = llm.engine.runner
    g = _graphs(runner, [1, 2, 4])
    gen = torch.Generator().manual_seed(0)
    kv = runner.kv_caches
    kv.normal_(generator=gen)  # a cache full of history
    before = kv.clone()
    tables = [np.array([3, 9]), np.array([5]), np.array([7, 1, 2])]
    lens = np.array([20, 4, 40])
    pos = lens - 1
    blocks = np.array([t[p // 16] for t, p in zip(tables, pos)])
    offsets = pos % 16
    ids = np.array([11, 12, 13])
    got = g.run(ids, pos, blocks, offsets, lens, tables)
    written = kv.clone()
    kv.copy_(before)
    padded = torch.zeros(3, 3, dtype=torch.int64)
    for i, t in enumerate(tables):
        padded[i, :len(t)] = torch.from_numpy(t)
    meta = AttentionMetadata(torch.from_numpy(blocks), torch.from_numpy(offsets), 3, padded, torch.from_numpy(lens),
                             40, [], 16)
    want = runner.model(torch.from_numpy(ids), torch.from_numpy(pos), kv, meta, None)
    assert got.shape == want.shape == (3, runner.arch.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the same values in the same three slots (a GEMM of 4 rows may round apart from one of 3)
    torch.testing.assert_close(written, kv, rtol=1e-5, atol=1e-5)
    changed = (written != before).any(dim=-1)  # [layers, 2, blocks, kv heads, offsets]
    slots = {(b, o) for b, o in zip(blocks.tolist(), offsets.tolist())}
    assert {(b, o) for _, _, b, _, o in changed.nonzero().tolist()} == slots
    assert g.replays == 1
    # what capture runs (warm-up and the captured call): padding only, so nothing is written
    kv.copy_(before)
    g._pad_inputs(4)
    out = g._forward(4)
    assert out.shape == (4, runner.arch.hidden_size) and torch.isfinite(out).all()
    assert torch.equal(kv, before)


def test_the_engine_with_the_graph_runner_gives_the_eager_tokens(tiny_dirs):
    """Whole runs: five requests ending at different steps, so decode steps of 5 (above the largest
    size: eager), 4, 3 (padded to 4), 2 and 1 all happen, beside prefill steps (eager)."""
    from pagedserve import SamplingParams

    prompts = [list(range(100, 100 + n)) for n in (5, 37, 20, 12, 23)]
    params = [SamplingParams(max_tokens=n, temperature=0, logprobs=1, ignore_eos=True) for n in (3, 9, 6, 12, 4)]
    llm = _llm(tiny_dirs)
    want = llm.generate(prompts, params, use_tqdm=False)
    runner = llm.engine.runner
    assert runner.graphs is None  # no graphs on a CPU by default
    _graphs(runner, [1, 2, 4])
    got = llm.generate(prompts, params, use_tqdm=False)
    assert runner.graphs.replays >= 8
    for a, b in zip(want, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            (ta, pa), (tb, pb) = next(iter(la.items())), next(iter(lb.items()))
            assert ta == tb and abs(pa.logprob - pb.logprob) < 1e-4
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    # --async-scheduling: the tokens in flight are written into the static ids on the device
    llm.engine.cfg.async_scheduling = True
    replays = runner.graphs.replays
    again = llm.generate(prompts, params, use_tqdm=False)
    assert runner.graphs.replays >= replays + 8
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in got]
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_what_cannot_be_captured_is_named(tiny_dirs):
    from pagedserve import LLM
    from pagedserve.testing import make_tiny_model

    llm = _llm(tiny_dirs)
    assert graphs_unsupported(llm.engine.runner.model, "triton", 1) is None
    assert "triton" in graphs_unsupported(llm.engine.runner.model, "cpp", 1)
    assert "tensor parallel" in graphs_unsupported(llm.engine.runner.model, "triton", 2)
    moe = LLM(str(make_tiny_model(tiny_dirs["llama3"].parent / "mixtral-graphs", "mixtral")), dtype="float32",
              max_model_len=128, kv_cache_memory=4 << 20)
    assert "Mixture-of-Experts" in graphs_unsupported(moe.engine.runner.model, "triton", 1)


def test_the_flags_reach_the_engine_config():
    from pagedserve.cli import build_parser
    from pagedserve.config import EngineConfig

    args = build_parser().parse_args(["serve", "--enforce-eager", "--cuda-graph-sizes", "1", "8", "64"])
    assert args.enforce_eager and args.cuda_graph_sizes == [1, 8, 64]
    assert build_parser().parse_args(["serve"]).enforce_eager is False
    with pytest.raises(ValueError, match="positive"):
        EngineConfig(cuda_graph_sizes=[4, -1])


def test_the_largest_step_runs_into_a_scratch_cache(tiny_dirs):
    """What the KV budget is profiled with on a GPU (model_runner.largest_step): the scheduler's
    largest step, prompts longer than max_model_len in several chunks, on any device; the real
    cache keeps its bytes."""
    from pagedserve import LLM

    llm = LLM(str(tiny_dirs["llama3"]), dtype="float32", max_model_len=256, kv_cache_memory=8 << 20, max_num_seqs=20)
    runner = llm.engine.runner
    runner.max_num_batched_tokens = 600  # > max_model_len (256): three chunks
    kv = runner.kv_caches
    kv.normal_(generator=torch.Generator().manual_seed(1))
    before = kv.clone()
    logits, scratch = runner.largest_step()
    assert logits.shape == (20, runner.arch.vocab_size) and torch.isfinite(logits).all()
    a = runner.arch
    assert scratch == a.num_layers * 2 * (16 + 16 + 6) * a.num_kv_heads * 16 * a.head_dim * 4
    assert torch.equal(kv, before)
