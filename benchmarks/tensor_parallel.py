"""The cost of tensor parallelism on this CPU (issue 28): the same random Llama-shaped model (hidden
1024, 8 layers, 16 heads / 8 KV heads, MLP 2816, vocabulary 32000) served by one rank on all the
cores against two ranks (gloo, one process each, the cores shared out), in the same run:

  decode    median time of a decode-only engine step at 16 and 64 sequences (200-token prompts),
            and rank 0's time inside the all-reduces per step (two per layer + the embedding's)
  prefill   one 512-token prompt's first step (the chunk's GEMMs and attention)
Greedy tokens are checked equal between the two (the parity itself is tests/test_tensor_parallel.py).

    python benchmarks/tensor_parallel.py [--dtype float32] [--steps 40]

Writes results/tensor_parallel.json and .png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench_common import finish, machine, pyplot

OUT = Path(__file__).parent / "results" / "tensor_parallel.json"


def build_model(folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pagedserve.model.loader import default_model_gguf, gguf_to_hf_folder

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.03)
    model.save_pretrained(str(folder))
    for f in gguf_to_hf_folder(default_model_gguf()).iterdir():  # a tokenizer (ids < 32000 only are used)
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def measure(folder: Path, tp: int, dtype: str, steps: int) -> dict:
    from pagedserve import LLM, SamplingParams
    from pagedserve.distributed.parallel import COMM_SECONDS

    llm = LLM(str(folder), dtype=dtype, max_model_len=1024, kv_cache_memory=256 << 20, tensor_parallel_size=tp,
              enable_prefix_caching=False, adaptive_threads=False)
    eng = llm.engine
    try:
        params = SamplingParams(max_tokens=steps + 20, temperature=0, ignore_eos=True)
        llm.generate([list(range(100, 300))] * 2, params, use_tqdm=False)  # warm-up
        res = {"tp": tp}
        for n in (16, 64):
            for i in range(n):
                eng.add_request(f"{n}-{i}", [100 + (i * 7 + j) % 30000 for j in range(200)], params)
            while any(r.num_output_tokens == 0 for r in eng.scheduler.running) or eng.scheduler.waiting:
                eng.step()
            times, comm = [], []
            for _ in range(steps):
                c0, t0 = COMM_SECONDS[0], time.perf_counter()
                eng.step()
                times.append(time.perf_counter() - t0)
                comm.append(COMM_SECONDS[0] - c0)
            while eng.has_unfinished_requests():
                eng.step()
            res[f"decode{n}_ms"] = 1e3 * statistics.median(times)
            res[f"decode{n}_comm_ms"] = 1e3 * statistics.median(comm)
        eng.add_request("p", list(range(100, 612)), SamplingParams(max_tokens=1))
        t0 = time.perf_counter()
        while eng.has_unfinished_requests():
            eng.step()
        res["prefill512_ms"] = 1e3 * (time.perf_counter() - t0)
        (o,) = llm.generate([list(range(100, 140))], SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)
        res["greedy"] = o.outputs[0].token_ids
        return res
    finally:
        eng.close()


def report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"tensor parallel on CPU, {res['dtype']} ({res['machine']}, {res['date']}, load {res['load']})")
    for c in ("ranks", "decode 16 seqs ms", "all-reduce ms", "decode 64 seqs ms", "all-reduce ms", "prefill 512 ms"):
        t.add_column(c, justify="right")
    for r in res["runs"]:
        t.add_row(str(r["tp"]), f"{r['decode16_ms']:.2f}", f"{r['decode16_comm_ms']:.2f}", f"{r['decode64_ms']:.2f}",
                  f"{r['decode64_comm_ms']:.2f}", f"{r['prefill512_ms']:.1f}")
    Console().print(t)
    print(f"greedy tokens equal: {res['greedy_equal']}")


def plot(res: dict):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ["decode 16", "decode 64", "prefill 512"]
    for i, r in enumerate(res["runs"]):
        vals = [r["decode16_ms"], r["decode64_ms"], r["prefill512_ms"] / 10]
        ax.bar([x + 0.4 * i for x in range(3)], vals, width=0.4, label=f"{r['tp']} rank(s)")
        if r["tp"] > 1:
            ax.bar([x + 0.4 * i for x in range(2)], [r["decode16_comm_ms"], r["decode64_comm_ms"]], width=0.4,
                   color="k", alpha=0.4, label="all-reduce")
    ax.set_xticks([x + 0.2 for x in range(3)], labels)
    ax.set(ylabel="ms (prefill / 10)", title=f"tensor parallel on CPU — {res['machine']}")
    ax.legend()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        print("building the model ...", flush=True)
        folder = build_model(Path(d))
        runs = []
        for tp in (1, 2):
            print(f"== {tp} rank(s)", flush=True)
            runs.append(measure(folder, tp, args.dtype, args.steps))
            print({k: v for k, v in runs[-1].items() if k != "greedy"}, flush=True)
    res = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "load": f"{os.getloadavg()[0]:.1f}",
           "dtype": args.dtype, "runs": runs, "greedy_equal": runs[0]["greedy"] == runs[1]["greedy"]}
    finish(res, OUT, report, plot)


if __name__ == "__main__":
    main()
