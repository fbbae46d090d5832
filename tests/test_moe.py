"""Mixture-of-Experts models (issue 28): tiny random Mixtral, Qwen2-MoE and OLMoE built with
transformers (save_pretrained writes the classic per-expert names) against transformers itself;
the grouped expert computation against a per-token loop; what is refused, by name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pagedserve import LLM, SamplingParams

KINDS = ("mixtral", "qwen2_moe", "olmoe")
PROMPTS = [list(range(100, 100 + n)) for n in (5, 37, 70)] + [[7, 8, 9, 10] * 9]


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    from pagedserve.testing import make_tiny_model

    root = tmp_path_factory.mktemp("moe")
    return {k: make_tiny_model(root / k, k) for k in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_greedy_match_transformers(moe_dirs, kind):
    """float32: every prompt position's log-probability within 1e-4 of transformers'; greedy
    tokens identical to transformers' generate, alone and batched (chunked prefill across steps)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(moe_dirs[kind]), dtype=torch.float32).eval()
    llm = LLM(str(moe_dirs[kind]), dtype="float32", max_model_len=256, kv_cache_memory=16 << 20,
              max_num_batched_tokens=48)
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, prompt_logprobs=0)
    batched = llm.generate(PROMPTS, sp, use_tqdm=False)
    for p, o in zip(PROMPTS, batched):
        with torch.no_grad():
            want_tokens = hf.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                      pad_token_id=0)[0, len(p):].tolist()
            lp = torch.log_softmax(hf(torch.tensor([p])).logits[0].float(), -1)
        got = torch.tensor([next(iter(e.values())).logprob for e in o.prompt_logprobs[1:]])
        want = torch.tensor([lp[i, p[i + 1]].item() for i in range(len(p) - 1)])
        assert (got - want).abs().max().item() < 1e-4
        assert o.outputs[0].token_ids == want_tokens
        (alone,) = llm.generate([p], sp, use_tqdm=False)
        assert alone.outputs[0].token_ids == want_tokens


def test_the_engine_says_what_it_loaded(moe_dirs):
    llm = LLM(str(moe_dirs["qwen2_moe"]), dtype="float32", max_model_len=128, kv_cache_memory=8 << 20)
    arch = llm.engine.arch
    assert (arch.moe.num_experts, arch.moe.num_experts_per_tok, arch.moe.shared_expert_intermediate_size) == (8, 2, 96)
    assert arch.moe_layers == (0,)  # layer 1 is in mlp_only_layers: dense
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(moe_dirs["qwen2_moe"]), dtype=torch.float32)
    assert arch.num_parameters() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("shared", [False, True])
def test_grouped_experts_equal_a_per_token_loop(shared):
    """Sorting the (token, expert) pairs by expert and running one matmul pair per expert gives
    what running each token through its k experts one by one gives."""
    from pagedserve.model.arch import ModelArch, MoEFields
    from pagedserve.model.moe import SparseMoE

    torch.manual_seed(0)
    arch = ModelArch("MixtralForCausalLM", 100, 32, 64, 1, 4, 2, 8, 1e-6, 1e4, None, 64, False, False, None, None, [],
                     moe=MoEFields(6, 3, 16, 24 if shared else 0, True), moe_layers=(0,))
    moe = SparseMoE(arch)
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(37, 32)
    got = moe(x)
    weights, ids = moe.route(x)
    for t in range(x.shape[0]):
        want = sum(weights[t, j] * moe.experts[str(int(ids[t, j]))](x[t:t + 1])[0] for j in range(3))
        if shared:
            want = want + torch.sigmoid(moe.shared_expert_gate(x[t:t + 1]))[0] * moe.shared_expert(x[t:t + 1])[0]
        torch.testing.assert_close(got[t], want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(weights.sum(-1), torch.ones(37))  # renormalized (Mixtral)


def _kernel_variants():
    from pagedserve.model import cpu_kernels

    k = cpu_kernels.load()
    if k is None:
        return []
    return (["float32", "int8 weights"] + (["bfloat16"] if k.packed_linear_bf16_supported() else [])
            + (["int4 weights, int8 activations"] if k.quant_linear_vnni_supported() else []))


@pytest.mark.parametrize("weights", _kernel_variants())
def test_one_call_for_all_experts_equals_one_call_each(weights):
    """moe_cpu.cpp's grouped product (threads split the experts when there are enough of them,
    else one expert after another) gives bit for bit what one kernel call per expert gives, for
    packed float and quantized experts, with experts that get no token and experts of another rank
    (expert parallel: zeros)."""
    from pagedserve.model import cpu_kernels
    from pagedserve.model.arch import ModelArch, MoEFields
    from pagedserve.model.llama import Linear, use_cpu_kernels
    from pagedserve.model.moe import SparseMoE
    from pagedserve.model.quantization.quantize import symmetric

    kernels = cpu_kernels.load(required=True)
    torch.manual_seed(0)
    arch = ModelArch("MixtralForCausalLM", 100, 64, 64, 1, 4, 2, 16, 1e-6, 1e4, None, 64, False, False, None, None,
                     [], moe=MoEFields(8, 2, 32, 0, True), moe_layers=(0,))
    moe = SparseMoE(arch).eval()
    for p in moe.parameters():
        p.data.normal_(0, 0.3)
    if weights.startswith("int"):
        for name, m in moe.named_modules():
            if isinstance(m, Linear) and name != "gate":
                m.set_quantized(symmetric(m.weight.data, 8 if weights == "int8 weights" else 4, 32))
    use_cpu_kernels(moe, kernels, weight_dtype=torch.bfloat16 if weights != "float32" else torch.float32,
                    int8_activation_rows=1 if "int8 activations" in weights else 0)
    assert moe._grouped() is not None
    for drop_rank_experts in (False, True):
        if drop_rank_experts:  # expert parallel: experts 1, 3, 5 and 7 live on another rank
            for e in ("1", "3", "5", "7"):
                del moe.experts[e]
            moe._grouped_cache = None
        for n in (1, 3, 64):  # 2 experts with work (one after another), up to all 8 (split over threads)
            x = torch.randn(n, 64)
            with torch.inference_mode():  # as the engine runs: the output is an inference tensor
                got = moe(x)
                SparseMoE.grouped_kernel = False
                try:
                    want = moe(x)
                finally:
                    SparseMoE.grouped_kernel = True
            assert torch.equal(got, want), (weights, n, drop_rank_experts)
            if n == 64 or not drop_rank_experts:  # (one token's experts may all be another rank's)
                assert got.abs().sum() > 0


@pytest.mark.parametrize("renormalize", [False, True])
def test_cpp_routing_and_combine_equal_torchs(renormalize):
    """moe_route picks the experts torch's softmax + top-k picks, with their probabilities, and sorts
    the pairs as a stable argsort does; moe_combine sums what the mul + index_add formulation sums."""
    from pagedserve.model import cpu_kernels

    kernels = cpu_kernels.load(required=True)
    torch.manual_seed(0)
    for t, e, k in ((1, 8, 2), (37, 64, 8), (200, 60, 4), (5, 4, 4)):
        logits = torch.randn(t, e) * 3
        weights, order, counts = kernels.moe_route(logits, k, renormalize)
        probs = torch.softmax(logits, -1)
        want_w, want_ids = torch.topk(probs, k, -1)
        if renormalize:
            want_w = want_w / want_w.sum(-1, keepdim=True)
        flat = want_ids.flatten()
        assert torch.equal(order, torch.argsort(flat, stable=True))
        assert counts == torch.bincount(flat, minlength=e).tolist()
        torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-7)
        ys = torch.randn(t * k, 24)
        want = torch.zeros(t, 24).index_add_(0, order // k, ys * weights.flatten()[order].unsqueeze(1))
        torch.testing.assert_close(kernels.moe_combine(ys, order, weights), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="top k must be in"):
        kernels.moe_route(torch.randn(3, 4), 5, True)
    with pytest.raises(RuntimeError, match="no permutation"):
        kernels.moe_combine(torch.randn(4, 8), torch.tensor([0, 1, 2, 9]), torch.rand(2, 2))


def test_grouped_linear_refuses_bad_groups():
    from pagedserve.model import cpu_kernels

    kernels = cpu_kernels.load(required=True)
    w, empty = kernels.pack_linear_weight(torch.randn(32, 16)), torch.empty(0)
    with pytest.raises(RuntimeError, match="counts sum to 4 rows, x has 5"):
        kernels.grouped_linear(torch.randn(5, 16), [1, 3], [w, empty, w, empty], 32)
    with pytest.raises(RuntimeError, match="two tensors per expert"):
        kernels.grouped_linear(torch.randn(4, 16), [1, 3], [w, empty], 32)
    with pytest.raises(RuntimeError, match="expected 48"):
        kernels.grouped_linear(torch.randn(4, 16), [1, 3], [w, empty, w, empty], 48)
    with pytest.raises(RuntimeError, match="outside x's 2"):
        kernels.grouped_linear(torch.randn(2, 16), [1, 3], [w, empty, w, empty], 32, rows=torch.tensor([0, 1, 1, 2]))
    x, rows = torch.randn(2, 16), torch.tensor([1, 0, 1, 1])  # gathered here = gathered before
    assert torch.equal(kernels.grouped_linear(x, [1, 3], [w, empty, w, empty], 32, rows=rows),
                       kernels.grouped_linear(x[rows], [1, 3], [w, empty, w, empty], 32))


def test_moe_in_bf16_and_int8(moe_dirs, tmp_path):
    """The CPU's default dtype (bf16 where the CPU has it) and a `pagedserve quantize --method
    int8` copy of the experts stay close to float32."""
    from pagedserve.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(moe_dirs["mixtral"]), "--method", "int8", "--out", str(out)]) == 0
    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    lps = {}
    for label, model, dtype in (("f32", moe_dirs["mixtral"], "float32"), ("auto", moe_dirs["mixtral"], "auto"),
                                ("int8", out, "float32")):
        llm = LLM(str(model), dtype=dtype, max_model_len=128, kv_cache_memory=8 << 20)
        if label == "int8":
            assert "int8 (quantized)" in llm.engine.runner.weights_description()
        (o,) = llm.generate([PROMPTS[2]], sp, use_tqdm=False)
        lps[label] = torch.tensor([next(iter(e.values())).logprob for e in o.prompt_logprobs[1:]])
    assert (lps["auto"] - lps["f32"]).abs().mean() < 0.05
    assert (lps["int8"] - lps["f32"]).abs().mean() < 0.05


@pytest.mark.parametrize("change,match", [
    ({"num_experts_per_tok": 17}, "between 1 and the"),
    ({"scoring_func": "sigmoid"}, "unsupported MoE routing"),
])
def test_unsupported_moe_configs_are_refused_at_startup(moe_dirs, tmp_path, change, match):
    d = tmp_path / "bad"
    shutil.copytree(moe_dirs["olmoe"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        LLM(str(d), dtype="float32", max_model_len=64, kv_cache_memory=8 << 20)


def test_quantize_refuses_calibrated_methods_for_moe(moe_dirs, tmp_path):
    from pagedserve.cli import main

    assert main(["quantize", str(moe_dirs["olmoe"]), "--method", "awq", "--out", str(tmp_path / "a")]) == 2
    assert not (tmp_path / "a").exists()


def test_the_planner_reads_experts_as_the_engine_does(moe_dirs):
    from pagedserve.model.arch import ModelArch
    from pagedserve.planner.specs import ModelSpec

    for kind in ("mixtral", "olmoe"):
        cfg = json.loads((moe_dirs[kind] / "config.json").read_text())
        spec, arch = ModelSpec.from_config(cfg), ModelArch.from_hf_config(cfg)
        assert (spec.experts, spec.experts_per_token, spec.expert_intermediate) == (
            arch.moe.num_experts, arch.moe.num_experts_per_tok, arch.moe.expert_intermediate_size)
        if kind == "mixtral":  # every layer has experts, no q/k norms: the totals agree exactly
            assert spec.total_params == arch.num_parameters()
    cfg = json.loads((moe_dirs["qwen2_moe"] / "config.json").read_text())
    assert ModelSpec.from_config(cfg).shared_intermediate == 96  # Qwen2-MoE's shared expert is counted
