"""Offline throughput: pagedserve LLM.generate vs Hugging Face transformers generate, one run.

Workload: seeded, 128 requests, prompts uniform 32-512 tokens, outputs uniform 32-256, ignore_eos.
  - pagedserve: all requests at once (continuous batching), KV budget that would hold only 8
    sequences if each reserved max_model_len (4096) up front;
  - transformers one request at a time (on the first --hf-solo requests; tokens/s extrapolates);
  - transformers static padded batches of 32 (each batch runs to its longest output).
Also measured: KV waste at peak (allocated-but-unused slots / allocated slots) and peak
concurrent sequences vs what reserving max_model_len per request would allow.

  python benchmarks/offline_throughput.py            # prints a table, writes results/*.json + .png
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pagedserve import LLM, SamplingParams
from pagedserve.bench.workload import synthetic_workload

RESULTS = Path(__file__).parent / "results"


def run_pagedserve(model_dir, reqs, max_model_len, reserve_seqs, max_num_seqs=256, kv_bytes=None):
    per_token = 46080  # SmolLM2-135M fp32 KV bytes per token (checked against the engine below)
    llm = LLM(str(model_dir), max_model_len=max_model_len, max_num_seqs=max_num_seqs,
              kv_cache_memory=kv_bytes or reserve_seqs * max_model_len * per_token)
    eng = llm.engine
    assert eng.arch.kv_bytes_per_token(4) == per_token
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
    for i, (r, p) in enumerate(zip(reqs, params)):
        eng.add_request(str(i), r.prompt_token_ids, p)
    peak_alloc = peak_used = peak_seqs = 0
    waste_at_peak = 0.0
    out_tokens = 0
    t0 = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(total=len(reqs), desc="pagedserve", unit="req")
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out_tokens += len(o.outputs[0].token_ids)
                bar.update(1)
        alloc = eng.kv.num_allocated_slots()
        used = sum(r.num_computed_tokens for r in eng.scheduler.running)
        peak_seqs = max(peak_seqs, eng.scheduler.num_running)
        if alloc > peak_alloc:
            peak_alloc, peak_used = alloc, used
            waste_at_peak = (alloc - used) / alloc
    bar.close()
    dt = time.perf_counter() - t0
    return {
        "output_tokens": out_tokens, "seconds": dt, "output_tok_s": out_tokens / dt,
        "kv_blocks": eng.kv.num_blocks, "kv_tokens": eng.kv.num_blocks * eng.kv.block_size,
        "kv_waste_at_peak": waste_at_peak, "peak_allocated_slots": peak_alloc, "peak_used_slots": peak_used,
        "peak_concurrent_seqs": peak_seqs, "reserved_max_model_len_seqs": reserve_seqs,
        "concurrency_gain": peak_seqs * max_model_len / (eng.kv.num_blocks * eng.kv.block_size),
        "preemptions": eng.scheduler.num_preemptions,
    }


def run_hf_solo(hf, reqs):
    out_tokens, t0 = 0, time.perf_counter()
    from tqdm import tqdm

    for r in tqdm(reqs, desc="hf one-at-a-time", unit="req"):
        ids = torch.tensor([r.prompt_token_ids])
        out = hf.generate(ids, max_new_tokens=r.max_tokens, min_new_tokens=r.max_tokens, do_sample=False, pad_token_id=2)
        out_tokens += out.shape[1] - ids.shape[1]
    dt = time.perf_counter() - t0
    return {"output_tokens": out_tokens, "seconds": dt, "output_tok_s": out_tokens / dt, "requests": len(reqs)}


def run_hf_static(hf, reqs, batch):
    useful, t0 = 0, time.perf_counter()
    from tqdm import tqdm

    for i in tqdm(range(0, len(reqs), batch), desc=f"hf static batch {batch}", unit="batch"):
        chunk = reqs[i : i + batch]
        width = max(len(r.prompt_token_ids) for r in chunk)
        ids = torch.full((len(chunk), width), 2, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(chunk):  # left padding
            ids[j, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[j, width - len(r.prompt_token_ids):] = 1
        longest = max(r.max_tokens for r in chunk)
        hf.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False, pad_token_id=2)
        useful += sum(r.max_tokens for r in chunk)  # tokens past a request's own length are waste
    dt = time.perf_counter() - t0
    return {"output_tokens": useful, "seconds": dt, "output_tok_s": useful / dt, "batch": batch}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--hf-solo", type=int, default=16, help="requests run one at a time through transformers")
    ap.add_argument("--static-batch", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--reserve-seqs", type=int, default=8, help="KV budget = this many max_model_len sequences")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--kv-cache-memory", type=int, default=None, help="bytes; overrides --reserve-seqs")
    ap.add_argument("--only-pagedserve", action="store_true", help="skip the transformers baselines (exploration)")
    ap.add_argument("--out", default=str(RESULTS / "offline_throughput.json"))
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from pagedserve.model.loader import resolve_model

    model_dir = resolve_model(None)
    reqs = synthetic_workload(args.num_requests, seed=0)
    res = {"paged": run_pagedserve(model_dir, reqs, args.max_model_len, args.reserve_seqs, args.max_num_seqs,
                                   args.kv_cache_memory)}
    if args.only_pagedserve:
        print(json.dumps(res["paged"], indent=2))
        return
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    res["hf_static"] = run_hf_static(hf, reqs, args.static_batch)
    res["hf_solo"] = run_hf_solo(hf, reqs[: args.hf_solo])

    p, s, o = res["paged"], res["hf_static"], res["hf_solo"]
    summary = {
        "speedup_vs_hf_solo": p["output_tok_s"] / o["output_tok_s"],
        "speedup_vs_hf_static": p["output_tok_s"] / s["output_tok_s"],
    }
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "num_requests": args.num_requests}
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Offline throughput, SmolLM2-135M fp32 (output tokens/s)")
    for c in ("engine", "output tok/s", "ratio (pagedserve / engine)", "seconds", "tokens"):
        t.add_column(c)
    for name, r in (("pagedserve LLM.generate", p), (f"HF static batch {args.static_batch}", s),
                    (f"HF one at a time ({args.hf_solo} reqs)", o)):
        t.add_row(name, f"{r['output_tok_s']:.1f}", f"{p['output_tok_s'] / r['output_tok_s']:.2f}x",
                  f"{r['seconds']:.1f}", str(r["output_tokens"]))
    Console().print(t)
    print(f"KV waste at peak: {p['kv_waste_at_peak'] * 100:.2f}% ({p['peak_used_slots']}/{p['peak_allocated_slots']} slots used)")
    print(f"Peak concurrent sequences: {p['peak_concurrent_seqs']} vs {args.reserve_seqs} if each reserved "
          f"max_model_len={args.max_model_len} -> {p['concurrency_gain']:.1f}x; preemptions: {p['preemptions']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": res, "summary": summary}, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = ["pagedserve", f"HF static {args.static_batch}", "HF one-at-a-time"]
    vals = [p["output_tok_s"], s["output_tok_s"], o["output_tok_s"]]
    ax.barh(names, vals, color=["#2a7", "#888", "#bbb"])
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.0f}", va="center")
    ax.set_xlabel("output tokens/s (higher is better)")
    ax.set_title(f"Offline throughput, {args.num_requests} requests, SmolLM2-135M fp32, CPU")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
