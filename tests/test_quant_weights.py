"""Quantized weights (issue 25): the kernels against the dequantized reference (the same values in
float), every GGUF block type kept quantized read back exactly, the default model served from its
Q4_1 GGUF quantized in memory, and bad checkpoints refused at load by name."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pagedserve.model import cpu_kernels, kernel_levels
from pagedserve.model.quantization import gguf as gguf_quant
from pagedserve.model.quantization.weight import QuantizedWeight


def _random_weight(n: int, k: int, bits: int, group: int, offsets: bool, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    if bits == 4:
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    else:
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    offs = torch.randn(n, k // group, generator=g) * 0.02 if offsets else None
    return QuantizedWeight(q, scales, offs, bits, group, "test")


@pytest.fixture(params=[lv.name for lv in kernel_levels.supported_levels()])
def kernels(request):
    """Each installed build this CPU runs (AVX-512 with VNNI / BF16 tiles, and AVX2's)."""
    return cpu_kernels.load_level(request.param)


@pytest.mark.parametrize("bits,n,k,group,offsets", [
    (4, 64, 96, 32, True), (4, 1152, 576, 32, True), (4, 48, 1536, 128, False), (4, 32, 576, 576, True),
    (8, 64, 96, 32, False), (8, 80, 1536, 64, True), (8, 16, 4096, 32, False), (8, 32, 576, 576, False),
    (8, 48, 512, 16, False),  # GGUF Q6_K's groups of 16
])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 13, 40])
def test_quant_linear_matches_the_dequantized_reference(kernels, bits, n, k, group, offsets, m):
    """Every path of quant_linear (the integer VNNI kernel at small batches, the dequantize-then-GEMM
    tiles in float32 and bf16 above) computes x @ dequantize(W).T + bias: float32 to rounding, bf16
    and the two-pass int8 activations to the precision of a bf16 product."""
    w = _random_weight(n, k, bits, group, offsets, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n)
    ref = x.double() @ w.dequantize().double().T + bias.double()
    scale = ref.abs().max().item()
    integer = kernels.quant_linear_vnni_supported() and m <= 4
    y = kernels.quant_linear(x, *w.pack(), bias, False)
    assert (y.double() - ref).abs().max().item() <= (3e-4 if integer else 1e-5) * scale
    if kernels.packed_linear_bf16_supported():
        yb = kernels.quant_linear(x, *w.pack(), bias, True)
        assert (yb.double() - ref).abs().max().item() <= (3e-4 if integer else 2e-2) * scale
        if not integer:  # exactly the bf16 GEMM of the rounded operands
            rounded = x.bfloat16().double() @ w.dequantize().bfloat16().double().T + bias.double()
            assert (yb.double() - rounded).abs().max().item() <= 5e-4 * scale


def test_the_integer_kernel_takes_small_batches_and_one_pass_is_coarser(kernels):
    """With one int8 pass per activation (llama.cpp's precision) the error is ~100x the default two
    passes' — the reason for the second pass; the knobs restore the defaults after. Where the build or
    CPU has no AVX512_VNNI, the knobs change nothing: every batch takes the float32 tile."""
    w = _random_weight(256, 576, 4, 32, True)
    x = torch.randn(2, 576)
    ref = x.double() @ w.dequantize().double().T
    if not kernels.quant_linear_vnni_supported():
        y = kernels.quant_linear(x, *w.pack())
        try:
            kernels.set_quant_activation_passes(1)
            assert torch.equal(kernels.quant_linear(x, *w.pack()), y)
        finally:
            kernels.set_quant_activation_passes(2)
        assert (y.double() - ref).abs().max().item() < 1e-4
        return
    err = {}
    try:
        for passes in (1, 2):
            kernels.set_quant_activation_passes(passes)
            err[passes] = (kernels.quant_linear(x, *w.pack()).double() - ref).abs().max().item()
        kernels.set_quant_vnni_max_rows(0)  # off: the float32 tile, exact to rounding
        err[0] = (kernels.quant_linear(x, *w.pack()).double() - ref).abs().max().item()
    finally:
        kernels.set_quant_activation_passes(2)
        kernels.set_quant_vnni_max_rows(4)
    assert err[0] < err[2] < err[1] / 20, err
    with pytest.raises(RuntimeError, match="1 or 2"):
        kernels.set_quant_activation_passes(3)


def _one_pass_reference(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x @ dequantize(W).T with x as the one-pass int8 kernel sees it, in float64: each group of G
    values rounded to s * q (s = max|x| / 127, q = round-half-even(x * 127 / max|x|), as float32
    computes it), and the offsets' term b * sum(x) from the unrounded x (the kernel sums x exactly)."""
    m, k = x.shape
    g = x.view(m, k // w.group_size, w.group_size)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    q = torch.round(g * inv).clamp(-127, 127)
    xh = (q.double() * (amax.double() / 127).float().double()).view(m, k)
    deq = w.dequantize().double()
    y = xh @ deq.T
    if w.offsets is not None:  # + sum over groups of (sum(x) - sum(x_hat)) * b
        y += (g.double().sum(-1) - xh.view(m, k // w.group_size, w.group_size).sum(-1)) @ w.offsets.double().T
    return y


@pytest.mark.parametrize("bits,n,k,group,offsets", [
    (4, 1152, 576, 32, True), (4, 48, 1536, 128, False), (8, 80, 1536, 64, True), (8, 48, 512, 16, False),
    (4, 64, 96, 8, True),  # a group under 16 values: the scalar quantizer
])
@pytest.mark.parametrize("m", [1, 3, 5, 13, 40])
def test_int8_activations_compute_the_one_pass_rounded_product(kernels, bits, n, k, group, offsets, m):
    """--activation-dtype int8 (quant_linear's int8_rows): batches of at least int8_rows rows take the
    integer kernel with one int8 pass per activation (above 4 rows its wide tile) — exactly x rounded
    per group to 8 bits, times the weights, to float rounding; coarser than the float path (the
    two-pass integer kernel at 1-4 rows), and the same bits as one-pass rows one at a time. Smaller
    batches than int8_rows are untouched. A build or CPU without
    AVX512_VNNI ignores int8_rows (the engine refuses the flag there at start: tested below)."""
    w = _random_weight(n, k, bits, group, offsets, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    x[0, :group] *= 40  # one loud group: its neighbours keep their own scale
    bias = torch.randn(n)
    if not kernels.quant_linear_vnni_supported():
        assert torch.equal(kernels.quant_linear(x, *w.pack(), bias, False, m), kernels.quant_linear(x, *w.pack(), bias))
        return
    exact = x.double() @ w.dequantize().double().T + bias.double()
    scale = exact.abs().max().item()
    y = kernels.quant_linear(x, *w.pack(), bias, True, m)
    ref = _one_pass_reference(x, w) + bias.double()
    assert (y.double() - ref).abs().max().item() <= 2e-5 * scale
    err_int8 = (y.double() - exact).abs().max().item()
    err_float = (kernels.quant_linear(x, *w.pack(), bias, False, 0).double() - exact).abs().max().item()
    assert err_float < err_int8 < 2e-2 * scale
    assert torch.equal(kernels.quant_linear(x, *w.pack(), bias, False, m + 1),
                       kernels.quant_linear(x, *w.pack(), bias, False, 0))  # under int8_rows: the float path
    try:
        kernels.set_quant_activation_passes(1)
        rows = torch.cat([kernels.quant_linear(x[i:i + 1], *w.pack(), bias) for i in range(m)])
    finally:
        kernels.set_quant_activation_passes(2)
    assert torch.equal(kernels.quant_linear(x, *w.pack(), bias, False, m), rows)


def test_the_integer_kernels_prefetch_changes_no_bit(kernels):
    """The integer tile's software prefetch of the weight stream (set_quant_prefetch, a benchmark's
    knob) is only a hint: any distance, none included, gives the same bits; out of range is refused."""
    w = _random_weight(64, 576, 4, 32, True)
    x = torch.randn(9, 576)
    try:
        outs = []
        for bytes_ahead in (0, 64, 1024, 1 << 16):  # past the weight's end included: a prefetch never faults
            kernels.set_quant_prefetch(bytes_ahead)
            outs.append(kernels.quant_linear(x, *w.pack(), None, False, 1))
    finally:
        kernels.set_quant_prefetch(1024)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    if kernels.quant_linear_vnni_supported():
        with pytest.raises(RuntimeError, match="0..65536"):
            kernels.set_quant_prefetch(-1)


def test_quant_embedding_reads_exact_rows_and_refuses_bad_ids(kernels):
    for bits in (4, 8):
        w = _random_weight(96, 64, bits, 32, bits == 4)
        ids = torch.tensor([0, 95, 17, 17, 40])
        # q * s + b as one fused multiply-add: within an ulp of torch's multiply, then add
        torch.testing.assert_close(kernels.quant_embedding(ids, *w.pack()), w.dequantize()[ids], rtol=1e-6, atol=1e-7)
        with pytest.raises(RuntimeError, match="outside the vocabulary"):
            kernels.quant_embedding(torch.tensor([96]), *w.pack())


def test_bad_quantized_weights_are_refused_with_what_to_change(kernels):
    with pytest.raises(ValueError, match="group size 48 does not divide the input dimension 64"):
        QuantizedWeight(torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 1), None, 4, 48)
    with pytest.raises(ValueError, match="4- or 8-bit"):
        QuantizedWeight(torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 2), None, 3, 32)
    with pytest.raises(ValueError, match="scales must be float32"):
        QuantizedWeight(torch.zeros(16, 64, dtype=torch.int8), torch.ones(16, 3), None, 8, 32)
    assert "not a multiple of 16" in QuantizedWeight(torch.zeros(24, 64, dtype=torch.int8), torch.ones(24, 2),
                                                     None, 8, 32).packable()
    assert "not a multiple of 8" in QuantizedWeight(torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 16),
                                                    None, 4, 4).packable()
    w = _random_weight(32, 64, 4, 32, True)
    qw, scales = w.pack()
    assert scales.shape == (2, 2, 32)  # per panel and group: 16 scales, then 16 offsets
    with pytest.raises(RuntimeError, match="x must be float32"):
        kernels.quant_linear(torch.randn(2, 63), qw, scales)
    with pytest.raises(RuntimeError, match="scales must be float32"):
        kernels.quant_linear(torch.randn(2, 64), qw, scales[..., :24].contiguous())


def test_packing_lets_the_unpacked_copy_go_and_rebuilds_it_exactly():
    for bits in (4, 8):
        w = _random_weight(64, 96, bits, 32, bits == 4)
        q, ref = w.q.clone(), w.dequantize()
        w.pack()
        assert w.q is None and w.shape == (64, 96)
        assert torch.equal(w.dequantize(), ref) and torch.equal(w.q, q)


@pytest.mark.parametrize("bits,offsets", [(4, True), (4, False), (8, False), (8, True)])
def test_scales_exact_in_float16_are_packed_as_float16_with_the_same_products(kernels, bits, offsets):
    """pack() keeps scales (and offsets) float16 when every one is exactly a float16 value, and the
    products are bit for bit those of the same values in float32 on every path; a scale float16
    cannot hold keeps the whole weight float32."""
    w = _random_weight(64, 576, bits, 32, offsets, seed=5)
    w.scales = w.scales.half().float()
    if offsets:
        w.offsets = w.offsets.half().float()
    as32 = QuantizedWeight(w.q.clone(), w.scales.clone(), None if w.offsets is None else w.offsets.clone(), bits, 32)
    qw, sb = w.pack()
    assert sb.dtype == torch.float16 and w.nbytes() == qw.numel() + sb.numel() * 2
    qw32, sb32 = as32.pack()
    as32._packed = (qw32, sb32.float())  # the same values, float32 in the layout
    assert torch.equal(w.dequantize(), as32.dequantize())
    for m in (1, 3, 9, 40):
        x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m))
        for bf16 in (False, True) if kernels.packed_linear_bf16_supported() else (False,):
            assert torch.equal(kernels.quant_linear(x, qw, sb, None, bf16), kernels.quant_linear(x, qw32, sb32.float(), None, bf16))
    ids = torch.tensor([0, 63, 17])
    assert torch.equal(kernels.quant_embedding(ids, qw, sb), kernels.quant_embedding(ids, qw32, sb32.float()))
    odd = _random_weight(64, 576, bits, 32, offsets, seed=6)
    odd.scales[3, 2] = 1e-3 + 1e-9  # not a float16 value
    assert odd.pack()[1].dtype == torch.float32


def test_mixed_layouts_fuse_exactly():
    """q/k/v in different formats (a GGUF mixing Q4_1 and Q8_0 rows, groups of 32 and 64) fuse into
    one weight with the same values."""
    parts = [_random_weight(32, 128, 4, 32, True, 1), _random_weight(16, 128, 8, 64, False, 2),
             _random_weight(16, 128, 4, 128, False, 3)]
    fused = QuantizedWeight.cat(parts)
    assert (fused.bits, fused.group_size) == (8, 32)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))


# -- GGUF ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", gguf_quant.KEPT_QUANTIZED)
def test_gguf_blocks_unpack_to_exactly_what_gguf_py_dequantizes(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    t = GGMLQuantizationType[kind]
    rng = np.random.default_rng(0)
    if kind.endswith("_K"):  # gguf-py has no K-quant quantizer: random blocks, every bit pattern
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[t]
        raw = rng.integers(0, 256, (48 * 512 // block, size), dtype=np.uint8)
        halves = (rng.random((raw.shape[0], 2)) * 0.05 + 1e-4).astype(np.float16).view(np.uint8)
        if kind == "Q6_K":
            raw[:, size - 2:] = halves[:, :2]  # d, at the end
        else:
            raw[:, :4] = halves  # d, dmin
        raw = raw.reshape(48, -1)
        w = gguf_quant.unpack(kind, raw, 48, 512)
        bits, group = {"Q4_K": (4, 32), "Q5_K": (8, 32), "Q6_K": (8, 16)}[kind]
        assert (w.bits, w.group_size, w.offsets is not None) == (bits, group, kind != "Q6_K")
        assert np.array_equal(w.dequantize().numpy(), dequantize(raw, t).reshape(48, 512))
        return
    x = rng.standard_normal((48, 256)).astype(np.float32) * 0.1
    raw = quantize(x, t)
    w = gguf_quant.unpack(kind, raw, 48, 256)
    assert np.array_equal(w.dequantize().numpy(), dequantize(raw, t).reshape(48, 256))


def _write_gguf(path, tensors: dict):
    """A GGUF holding only `tensors` ({name: (type name, float array)}), quantized with gguf-py."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    w = GGUFWriter(str(path), "llama")
    for name, (kind, x) in tensors.items():
        t = GGMLQuantizationType[kind]
        if kind in ("Q8_1", "Q3_K"):  # no quantizer in gguf-py: raw blocks of the right size
            from gguf import GGML_QUANT_SIZES

            block, size = GGML_QUANT_SIZES[t]
            rng = np.random.default_rng(0)
            raw = rng.integers(0, 8, (x.shape[0], x.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=t)
        else:
            w.add_tensor(name, quantize(x, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_loader_keeps_block_types_quantized_and_says_what_it_expands(tmp_path, caplog):
    from pagedserve.model.loader import read_gguf_weights

    rng = np.random.default_rng(1)
    x = {n: rng.standard_normal((64, 256)).astype(np.float32) for n in ("q", "k", "o", "g")}
    path = tmp_path / "m.gguf"
    _write_gguf(path, {"blk.0.attn_q.weight": ("Q4_1", x["q"]), "blk.0.attn_k.weight": ("Q8_0", x["k"]),
                       "blk.0.attn_output.weight": ("Q3_K", x["o"]), "blk.0.ffn_gate.weight": ("F32", x["g"])})
    with caplog.at_level(logging.WARNING, logger="pagedserve.loader"):
        quant = read_gguf_weights(path, num_heads=4, num_kv_heads=4, arch="llama", keep_quantized=True)
    plain = read_gguf_weights(path, num_heads=4, num_kv_heads=4, arch="llama")
    q, k = quant["model.layers.0.self_attn.q_proj.weight"], quant["model.layers.0.self_attn.k_proj.weight"]
    assert isinstance(q, QuantizedWeight) and (q.bits, q.source) == (4, "gguf Q4_1")
    assert isinstance(k, QuantizedWeight) and (k.bits, k.source) == (8, "gguf Q8_0")
    # rope un-permutation applies to quantized rows as to float ones
    assert torch.equal(q.dequantize(), plain["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(k.dequantize(), plain["model.layers.0.self_attn.k_proj.weight"])
    assert torch.is_tensor(quant["model.layers.0.self_attn.o_proj.weight"])  # Q3_K: dequantized, said
    assert "1 Q3_K tensors dequantized to float at load" in caplog.text
    assert torch.equal(quant["model.layers.0.mlp.gate_proj.weight"], torch.from_numpy(x["g"]))

    bad = tmp_path / "bad.gguf"
    _write_gguf(bad, {"blk.0.attn_q.weight": ("Q8_1", x["q"])})
    with pytest.raises(ValueError, match="tensor blk.0.attn_q.weight is Q8_1, a GGUF type pagedserve cannot load"):
        read_gguf_weights(bad, num_heads=4, num_kv_heads=4, arch="llama", keep_quantized=True)


# -- the default model, served from its Q4_1 GGUF -----------------------------------------------

@pytest.fixture(scope="module")
def quantized_llm():
    from pagedserve import LLM

    return LLM(None, max_model_len=1024, kv_cache_memory=64 << 20, dtype="float32", activation_dtype="float")


def test_default_model_stays_quantized_in_memory(quantized_llm):
    """Resident weight bytes within 1.3x the GGUF file (issue 25's target; float32 was ~8x)."""
    from pagedserve.model.loader import default_model_gguf

    runner = quantized_llm.engine.runner
    assert quantized_llm.engine.quantization == "gguf"
    kinds = {w.source for w in runner.quantized_weights.values()}
    assert kinds == {"gguf Q4_1", "gguf Q8_0"}, kinds
    assert runner.weight_bytes <= 1.3 * default_model_gguf().stat().st_size
    assert runner.model.lm_head.quant is runner.model.embed_tokens.quant  # tied: one copy
    # GGUF's d and m are float16 in the file: the packed scales stay float16 (fewer bytes a step)
    assert {w.pack()[1].dtype for w in runner.quantized_weights.values()} == {torch.float16}
    # resident: the packed tensors alone (the unpacked byte-a-value copy is let go once packed)
    packed = sum(t.numel() * t.element_size() for w in runner.quantized_weights.values() for t in w.pack()
                 if t is not None)
    floats = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    assert all(w.q is None for w in runner.quantized_weights.values())
    assert runner.weight_bytes == packed + floats
    assert runner.model.fused is not None or cpu_kernels.load() is None
    if cpu_kernels.load() is not None:  # the packed tensors sit in one huge-page buffer (cpu_memory.py)
        from test_cpu_memory import assert_packed_weights_in_one_arena

        assert assert_packed_weights_in_one_arena(runner.model) == 2 * len(runner.quantized_weights)


def test_default_model_quantized_generates_what_its_float_copy_does(quantized_llm, llm):
    """Greedy decoding from the quantized weights against the same values dequantized to float32
    (`llm`: the GGUF's converted folder). Prefill runs the float32 tile on the same values (exact to
    rounding); decode steps the two-pass integer kernel."""
    from pagedserve import SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
               "List three colors:"]
    sp = SamplingParams(max_tokens=48, temperature=0)
    a = [o.outputs[0].token_ids for o in quantized_llm.generate(prompts, sp, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    assert same >= 0.9 * sum(len(p) for p in b), (a, b)


def test_without_the_kernels_quantized_weights_run_dequantized(caplog):
    """The PyTorch attention backend (no C++ kernels): every quantized weight is dequantized at
    load, said in the log, and the model computes the same greedy tokens."""
    from pagedserve import LLM, SamplingParams

    with caplog.at_level(logging.WARNING, logger="pagedserve.runner"):
        llm = LLM(None, max_model_len=256, kv_cache_memory=16 << 20, dtype="float32", attention_backend="torch")
    assert "quantized weights run dequantized to float32" in caplog.text
    assert not llm.engine.runner.quantized_weights
    (o,) = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    assert "Paris" in o.outputs[0].text


def test_int8_activations_serve_the_default_model_close_to_its_float_activations(quantized_llm):
    """--activation-dtype int8 on the default model's Q4_1 weights: the prompt (one batch of 300
    rows: the wide int8 tile) scores within a few percent of float activations' perplexity, with
    most top-1 tokens the same; the start-up log says it. Where the CPU or build has no
    AVX512_VNNI, the flag is refused at start instead, by name."""
    from pathlib import Path

    from pagedserve import LLM, SamplingParams

    ks = cpu_kernels.load()
    if ks is None or not ks.quant_linear_vnni_supported():
        with pytest.raises(ValueError, match="AVX512_VNNI"):
            LLM(None, max_model_len=1024, kv_cache_memory=64 << 20, dtype="float32", activation_dtype="int8")
        return
    int8 = LLM(None, max_model_len=1024, kv_cache_memory=64 << 20, dtype="float32", activation_dtype="int8")
    assert int8.engine.runner.int8_activation_rows > 0
    assert "int8 activations" in int8.engine.runner.weights_description()
    text = (Path(__file__).parents[1] / "benchmarks/data/eval_text.txt").read_text()
    ids = int8.get_tokenizer()(text).input_ids[:300]
    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    runs = [llm.generate([ids], sp, use_tqdm=False)[0].prompt_logprobs[1:] for llm in (quantized_llm, int8)]
    lp = [np.array([pos[t].logprob for pos, t in zip(run, ids[1:])]) for run in runs]
    top1 = [[max(pos, key=lambda t: pos[t].logprob) for pos in run] for run in runs]
    ppl = [float(np.exp(-x.mean())) for x in lp]
    assert 0 < np.abs(lp[0] - lp[1]).mean() < 0.3, ppl  # int8 really ran (measured 0.13 a token), and stayed close
    assert ppl[1] <= 1.05 * ppl[0], ppl
    assert np.mean([a == b for a, b in zip(*top1)]) >= 0.85
    (o,) = int8.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    assert "Paris" in o.outputs[0].text  # decode steps (one row each) take int8 activations too


def test_auto_activations_compute_as_each_formats_own_engine(tiny_dirs, tmp_path):
    """--activation-dtype auto: a GGUF's quantized weights take int8 activations where the CPU has
    AVX512_VNNI (llama.cpp's numerics, and its speed), on one rank only; a float model and an
    int4 checkpoint in vLLM's formats (here `pagedserve quantize`'s compressed-tensors) keep float
    activations (W4A16); `float` keeps a GGUF on float activations."""
    from pagedserve import LLM
    from pagedserve.model.quantization.quantize import quantize_model

    ks = cpu_kernels.load()
    vnni = ks is not None and ks.quant_linear_vnni_supported()
    small = dict(max_model_len=256, kv_cache_memory=16 << 20, dtype="float32")
    gguf = LLM(None, **small)
    assert gguf.engine.runner.int8_activation_rows == int(vnni)
    assert ("int8 activations" in gguf.engine.runner.weights_description()) == vnni
    assert LLM(None, activation_dtype="float", **small).engine.runner.int8_activation_rows == 0
    assert LLM(str(tiny_dirs["llama"]), **small).engine.runner.int8_activation_rows == 0
    out = tmp_path / "w4"
    quantize_model(str(tiny_dirs["llama"]), "int4-rtn", out, group_size=16)
    w4 = LLM(str(out), **small)
    assert w4.engine.runner.quantized_weights and w4.engine.runner.int8_activation_rows == 0


def test_int8_activations_are_refused_where_they_cannot_apply(tiny_dirs):
    """A model with float weights, tensor parallelism, or a name that is not one: a clear error at
    start."""
    from pagedserve import LLM
    from pagedserve.config import EngineConfig

    with pytest.raises(ValueError, match="activation_dtype must be one of"):
        EngineConfig(activation_dtype="fp4")
    with pytest.raises(ValueError, match="does not run under tensor parallelism"):
        EngineConfig(activation_dtype="int8", tensor_parallel_size=2)
    ks = cpu_kernels.load()
    match = "has none" if ks is not None and ks.quant_linear_vnni_supported() else "AVX512_VNNI"
    with pytest.raises(ValueError, match=match):
        LLM(str(tiny_dirs["llama"]), max_model_len=128, kv_cache_memory=8 << 20, dtype="float32",
            activation_dtype="int8")


def test_activation_dtype_is_a_serve_flag():
    """`pagedserve serve --activation-dtype` takes the config's names and nothing else."""
    from pagedserve.cli import build_parser
    from pagedserve.config import ACTIVATION_DTYPES

    for name in ACTIVATION_DTYPES:
        assert build_parser().parse_args(["serve", "--activation-dtype", name]).activation_dtype == name
    assert build_parser().parse_args(["serve"]).activation_dtype == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--activation-dtype", "fp4"])
