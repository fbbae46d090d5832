"""Tensor parallelism (issue 28) on this CPU with gloo: two ranks, two processes, against one rank
on the same model in float32 — dense Llama with KV heads split, MQA with the KV head replicated,
Mixtral, Qwen2-MoE and OLMoE with every expert split; then `pagedserve serve --tensor-parallel-size 2`
(stream, abort, clean shutdown with no rank left behind, a killed rank -> 503 and a non-zero
exit), and the shapes it refuses at start."""

from __future__ import annotations

import json
import shutil
import signal
import time

import httpx
import psutil
import pytest
import torch

from pagedserve import LLM, SamplingParams

PROMPTS = [list(range(100, 100 + n)) for n in (5, 37, 70)] + [[7, 8, 9, 10] * 9]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_dirs):
    from pagedserve.testing import make_tiny_model

    root = tmp_path_factory.mktemp("tp")
    out = {"llama3": tiny_dirs["llama3"], "mixtral": make_tiny_model(root / "mixtral", "mixtral"),
           "qwen2_moe": make_tiny_model(root / "qwen2_moe", "qwen2_moe"), "olmoe": make_tiny_model(root / "olmoe", "olmoe")}
    mqa = root / "mqa"  # one KV head: both ranks keep it (replicated), each its own query heads
    shutil.copytree(tiny_dirs["llama"], mqa)
    cfg = json.loads((mqa / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    w = load_file(str(mqa / "model.safetensors"))
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    for n in list(w):
        if n.endswith(("k_proj.weight", "v_proj.weight")):
            w[n] = w[n][:d].contiguous()
    save_file(w, str(mqa / "model.safetensors"))
    cfg["num_key_value_heads"] = 1
    (mqa / "config.json").write_text(json.dumps(cfg))
    out["mqa"] = mqa
    return out


def _run(model, tp: int, **kw):
    llm = LLM(str(model), dtype="float32", max_model_len=256, kv_cache_memory=16 << 20, tensor_parallel_size=tp,
              max_num_batched_tokens=48, **kw)
    try:
        sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=0)
        outs = llm.generate(PROMPTS, sp, use_tqdm=False)
        return [(o.outputs[0].token_ids, torch.tensor([next(iter(e.values())).logprob for e in o.prompt_logprobs[1:]]))
                for o in outs], llm.engine.runner
    finally:
        llm.engine.close()


@pytest.mark.parametrize("kind", ["llama3", "mqa", "mixtral", "qwen2_moe", "olmoe"])
def test_two_ranks_equal_one(models, kind):
    """Batched steps with chunked prefill beside decodes: every prompt log-probability within 1e-4
    and the same greedy tokens with the model split over two processes (OLMoE: its q/k norms over
    all heads summed across the ranks)."""
    one, _ = _run(models[kind], 1)
    two, runner = _run(models[kind], 2)
    assert runner.model_arch.num_heads * 2 == runner.arch.num_heads  # really split
    assert runner.workers is not None and runner.workers.dead() is not None  # closed: the worker has exited
    for (t1, l1), (t2, l2) in zip(one, two):
        assert t1 == t2
        assert (l1 - l2).abs().max().item() < 1e-4


def test_two_ranks_with_a_step_in_flight(models):
    """--async-scheduling under tensor parallelism: rank 0 fills the tokens in flight into the ids
    before it sends them, so the other rank runs the same inputs."""
    one, _ = _run(models["llama3"], 1)
    two, _ = _run(models["llama3"], 2, async_scheduling=True)
    for (t1, l1), (t2, l2) in zip(one, two):
        assert t1 == t2
        assert (l1 - l2).abs().max().item() < 1e-4


def test_quantized_weights_stay_quantized_on_each_rank(models, tmp_path):
    """An int4 checkpoint (`pagedserve quantize`, groups of 16) split over two ranks: each rank
    keeps its rows and whole groups of columns quantized (nothing dequantized), and the answers
    equal one rank's."""
    from pagedserve.model.quantization.quantize import quantize_model

    q = quantize_model(str(models["llama3"]), "int4-rtn", tmp_path / "int4", group_size=16)
    one, _ = _run(q, 1)
    two, runner = _run(q, 2)
    kept = {w.source for w in runner.quantized_weights.values()}
    assert kept and runner.model.layers[0].self_attn.o_proj.quant is not None, kept  # a column-split weight
    assert runner.model.layers[0].mlp.down_proj.quant.shape[1] * 2 == runner.arch.intermediate_size
    for (t1, l1), (t2, l2) in zip(one, two):
        assert t1 == t2
        assert (l1 - l2).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_expert_parallel_equals_one_rank(models, kind):
    """--enable-expert-parallel: each rank holds whole experts (even ids on rank 0, odd on rank 1)
    and computes only the pairs routed to them; same tokens, log-probabilities within 1e-4."""
    one, _ = _run(models[kind], 1)
    two, runner = _run(models[kind], 2, enable_expert_parallel=True)
    moe = runner.model.layers[0].mlp
    assert sorted(moe.experts) == [str(e) for e in range(0, moe.num_experts, 2)]  # rank 0's, whole
    assert moe.experts["0"].intermediate == runner.arch.moe.expert_intermediate_size
    for (t1, l1), (t2, l2) in zip(one, two):
        assert t1 == t2
        assert (l1 - l2).abs().max().item() < 1e-4


def test_shapes_that_do_not_split_are_refused_at_start(models, tiny_dirs, tmp_path):
    d = tmp_path / "one-head"
    shutil.copytree(tiny_dirs["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(num_attention_heads=1, num_key_value_heads=1)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not divide its 1 attention heads"):
        LLM(str(d), dtype="float32", max_model_len=64, kv_cache_memory=8 << 20, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="for Mixture-of-Experts models"):
        LLM(str(models["llama3"]), dtype="float32", max_model_len=64, kv_cache_memory=8 << 20,
            tensor_parallel_size=2, enable_expert_parallel=True)
    with pytest.raises(ValueError, match="more ranks than this process's"):
        LLM(str(models["llama3"]), dtype="float32", max_model_len=64, kv_cache_memory=8 << 20,
            tensor_parallel_size=64)


def _workers(server) -> list[psutil.Process]:
    return [c for c in psutil.Process(server.proc.pid).children(recursive=True)
            if "pagedserve.distributed.workers" in " ".join(c.cmdline())]


def test_serving_with_two_ranks(models, tmp_path):
    """Through the OpenAI server: a streamed chat completion, a stream the client drops (aborted,
    the next request still served), then SIGTERM: exit 0 and no rank process left."""
    import openai
    from server_utils import ServerProcess

    s = ServerProcess([str(models["llama3"]), "--served-model-name", "m", "--tensor-parallel-size", "2", "--dtype",
                       "float32", "--kv-cache-memory", "16MiB", "--max-model-len", "256"], tmp_path / "s.log")
    try:
        workers = _workers(s)
        assert len(workers) == 1
        c = openai.OpenAI(base_url=s.base, api_key="x", max_retries=0)
        chunks = list(c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=12, temperature=0, stream=True))
        assert sum(len(ch.choices[0].delta.content or "") for ch in chunks if ch.choices) > 0
        with c.chat.completions.create(model="m", messages=[{"role": "user", "content": "count"}], max_tokens=200,
                                       stream=True, extra_body={"ignore_eos": True}) as stream:
            next(iter(stream))  # one chunk, then the client goes away
        r = c.completions.create(model="m", prompt="hello", max_tokens=5, temperature=0)
        assert r.choices[0].text is not None and r.usage.completion_tokens == 5
        assert "tensor_parallel=2" in (tmp_path / "s.log").read_text()
    finally:
        code = s.stop()
    assert code == 0
    psutil.wait_procs(workers, timeout=10)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_a_killed_rank_takes_the_server_down(models, tmp_path):
    from server_utils import ServerProcess

    s = ServerProcess([str(models["llama3"]), "--tensor-parallel-size", "2", "--dtype", "float32",
                       "--kv-cache-memory", "16MiB", "--max-model-len", "256"], tmp_path / "s.log")
    try:
        (worker,) = _workers(s)
        worker.send_signal(signal.SIGKILL)
        saw_503 = False
        deadline = time.monotonic() + 30
        while s.proc.poll() is None and time.monotonic() < deadline:
            try:
                saw_503 |= httpx.get(f"{s.url}/health", timeout=2).status_code == 503
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert saw_503, "health never answered 503 after a rank died"
        assert s.proc.wait(30) != 0  # exits on its own, non-zero: a supervisor restarts it
        assert "tensor-parallel worker rank 1 exited" in (tmp_path / "s.log").read_text()
    finally:
        s.stop()


def test_two_nodes_rehearsed_on_loopback(models, tmp_path):
    """torchrun's spelling over two "machines" on this one: node 1 runs only its rank and waits
    for node 0 (which serves the API) at --master-addr:--master-port; the answers equal a single
    rank's; stopping node 0 stops node 1's rank, which exits 0."""
    import subprocess
    import sys

    import openai
    from server_utils import ServerProcess, free_port

    port = free_port()
    common = [str(models["llama3"]), "--served-model-name", "m", "--dtype", "float32", "--kv-cache-memory", "16MiB",
              "--max-model-len", "256", "--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(port)]
    with open(tmp_path / "node1.log", "w") as log1:
        node1 = subprocess.Popen([sys.executable, "-m", "pagedserve.cli", "serve", *common, "--node-rank", "1"],
                                 stdout=log1, stderr=subprocess.STDOUT)
        try:
            s = ServerProcess([*common, "--node-rank", "0"], tmp_path / "node0.log")
            try:
                c = openai.OpenAI(base_url=s.base, api_key="x", max_retries=0)
                two = c.completions.create(model="m", prompt=list(range(100, 130)), max_tokens=8, temperature=0)
            finally:
                assert s.stop() == 0
            assert node1.wait(30) == 0
        finally:
            if node1.poll() is None:
                node1.kill()
    llm = LLM(str(models["llama3"]), dtype="float32", max_model_len=256, kv_cache_memory=16 << 20)
    (one,) = llm.generate([list(range(100, 130))], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    assert two.choices[0].text == one.outputs[0].text
    assert "node 1 of 2: ranks 1-1" in (tmp_path / "node1.log").read_text()
