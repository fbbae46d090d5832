"""Quantized weights side by side in one run (issue 25): accuracy, memory, speed.

1. accuracy on the default model: perplexity on the fixed text (benchmarks/data/eval_text.txt),
   teacher-forced top-1 agreement, and greedy-decoding agreement (8 prompts x 48 tokens: the decode
   steps, where small batches take the integer kernel) against float32 weights, for: the Q4_1 GGUF
   kept quantized (float32 and bf16 activations), `pagedserve quantize` int8 / int4-rtn / gptq / awq
   (groups of 32: SmolLM2's 576 is no multiple of 128), the GGUF with int8 activations
   (--activation-dtype int8) and with int8 / fp8 KV caches.
   NOTE: the default model exists only as Q4_1, so "float32" is its Q4_1 weights dequantized; the
   re-quantized variants quantize an already 4-bit model (a harder case than a float original);
2. memory: resident weight bytes of each, against the GGUF file;
3. speed: the projections of 30 SmolLM2 layers (distinct weights, streamed from memory) at batch
   M = 1..256: float32 and bf16 packed GEMMs against 4-bit and 8-bit quantized ones, through the
   integer VNNI kernel (two int8 passes), through the dequantize-then-GEMM tiles, and with one-pass
   int8 activations on the wide integer tile (--activation-dtype int8), that with and without its
   software prefetch of the weight stream; and offline c=1 ms/token.

  python benchmarks/quant_weights.py            # all (~6 min on 2 cores)
  python benchmarks/quant_weights.py --from-json
  python benchmarks/quant_weights.py --accuracy-only   # the accuracy/memory table (~3 min)
  python benchmarks/quant_weights.py --kernels-only    # the kernel table (~2 min)
  python benchmarks/quant_weights.py --kquants   # a llama.cpp Q4_K_M file: kept quantized vs its float copy
  python benchmarks/quant_weights.py --second-model   # the accuracy table on a float Llama trained here
                                                      # (benchmarks/second_model.py; ~2 min)

--kquants: llama.cpp's own quantizer (libllama's llama_model_quantize, from the build
benchmarks/peers.py makes) turns the F32 GGUF of the default model into Q4_K_M; SmolLM2's rows of
576 are no multiple of 256, so llama.cpp falls back to Q5_0 / Q8_0 for those and uses Q4_K / Q6_K
for the 1536-wide down projections (as it does for any such model). pagedserve loads the file kept
quantized and as its dequantized float32 copy: perplexity, greedy agreement, resident bytes, and
which GGUF types stayed quantized. Merged into results/quant_weights.json under "kquants".
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

from bench_common import finish, machine, pyplot

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "quant_weights.json"
TEXT = Path(__file__).parent / "data" / "eval_text.txt"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "List three colors:", "Water boils at", "The best way to learn a language is",
           "import numpy as np\n", "Dear team, thank you for"]


def _llm(model: str | None, **kw):
    from pagedserve import LLM

    return LLM(model, max_model_len=2048, kv_cache_memory=256 << 20, enable_prefix_caching=False, **kw)


def accuracy(workdir: Path) -> dict:
    from pagedserve.model.loader import default_model_gguf, resolve_model
    from pagedserve.model.quantization.quantize import quantize_model

    float_dir = str(resolve_model(None))
    made = {m: str(quantize_model(None, m, workdir / m, group_size=32)) for m in ("int8", "int4-rtn", "gptq", "awq")}
    variants = [  # label, model, engine kwargs
        ("float32", float_dir, {"dtype": "float32"}),
        ("GGUF Q4_1, float32 act.", None, {"dtype": "float32", "activation_dtype": "float"}),
        ("GGUF Q4_1, bf16 act.", None, {"dtype": "auto", "activation_dtype": "float"}),
        ("GGUF Q4_1, int8 act. (default)", None, {"dtype": "auto", "activation_dtype": "int8"}),
        ("int8 (W8A16)", made["int8"], {"dtype": "float32"}),
        ("int4-rtn g32 (W4A16)", made["int4-rtn"], {"dtype": "float32"}),
        ("GPTQ g32", made["gptq"], {"dtype": "float32"}),
        ("AWQ g32", made["awq"], {"dtype": "float32"}),
        ("GGUF Q4_1 + int8 KV", None, {"dtype": "float32", "activation_dtype": "float", "kv_cache_dtype": "int8"}),
        ("GGUF Q4_1 + fp8 KV", None, {"dtype": "float32", "activation_dtype": "float", "kv_cache_dtype": "fp8"}),
    ]
    res = compare(variants)
    res["_gguf_file_bytes"] = default_model_gguf().stat().st_size
    return res


def compare(variants: list[tuple[str, str | None, dict]], text: str | None = None) -> dict:
    """Each (label, model, engine kwargs) against the first: perplexity on the fixed text (or
    `text`), top-1 and greedy agreement, resident weights."""
    from pagedserve import SamplingParams
    from pagedserve.bench.accuracy import agreement_pct, prompt_stats

    sp = SamplingParams(max_tokens=48, temperature=0)
    res, base = {}, None
    for label, model, kw in variants:
        llm = _llm(model, **kw)
        ids = llm.get_tokenizer()(text or TEXT.read_text()).input_ids
        ppl, top = prompt_stats(llm, ids)
        gen = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
        base = base or {"ppl": ppl, "top": top, "gen": gen}
        same = sum(a == b for g, h in zip(gen, base["gen"]) for a, b in zip(g, h))
        r = llm.engine.runner
        res[label] = {"perplexity": ppl, "ppl_delta_pct": 100 * (ppl / base["ppl"] - 1),
                      "top1_agreement_pct": agreement_pct(base["top"], top),
                      "greedy_agreement_pct": 100 * same / sum(len(h) for h in base["gen"]),
                      "weights": r.weights_description(), "weight_bytes": r.weight_bytes}
        print(f"  {label:>26}: ppl {ppl:.3f} ({res[label]['ppl_delta_pct']:+.2f}%), top-1 "
              f"{res[label]['top1_agreement_pct']:.1f}%, greedy {res[label]['greedy_agreement_pct']:.1f}%, "
              f"weights {r.weight_bytes / 2**20:.0f} MiB ({res[label]['weights']})", flush=True)
        del llm
        gc.collect()
    return res


def kernels(rounds: int = 5) -> dict:
    import torch

    from pagedserve.model import cpu_kernels
    from pagedserve.model.quantization.weight import QuantizedWeight

    m = cpu_kernels.load(required=True)
    shapes = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
    layers = 30
    g = torch.Generator().manual_seed(0)

    def qw(n, k, bits):
        q = (torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g) if bits == 4
             else torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g))
        w = QuantizedWeight(q, torch.rand(n, k // 32, generator=g) * 0.01,
                            torch.randn(n, k // 32, generator=g) * 0.01 if bits == 4 else None, bits, 32)
        w.pack()
        return w

    w4 = {s: [qw(n, k, 4) for _ in range(layers)] for s, (n, k) in shapes.items()}
    w8 = {s: [qw(n, k, 8) for _ in range(layers)] for s, (n, k) in shapes.items()}
    dense = {s: [w.dequantize() for w in ws] for s, ws in w4.items()}
    f32 = {s: [m.pack_linear_weight(w) for w in ws] for s, ws in dense.items()}
    bf16 = ({s: [m.pack_linear_weight_bf16(w) for w in ws] for s, ws in dense.items()}
            if m.packed_linear_bf16_supported() else None)
    del dense
    bf = m.packed_linear_bf16_supported()
    kinds = {"float32": lambda x, s, i: m.packed_linear(x, f32[s][i]),
             **({"bf16": lambda x, s, i: m.packed_linear(x, bf16[s][i])} if bf else {}),
             "int4 integer": lambda x, s, i: m.quant_linear(x, *w4[s][i].pack(), None, bf),
             "int4 dequant-GEMM": lambda x, s, i: m.quant_linear(x, *w4[s][i].pack(), None, bf),
             "int8 integer": lambda x, s, i: m.quant_linear(x, *w8[s][i].pack(), None, bf),
             "int8 dequant-GEMM": lambda x, s, i: m.quant_linear(x, *w8[s][i].pack(), None, bf),
             # --activation-dtype int8: one int8 pass per activation at every M (the 10-row tile above 4)
             "int4 int8-act": lambda x, s, i: m.quant_linear(x, *w4[s][i].pack(), None, bf, 1),
             # the same without the integer tile's software prefetch of the weight stream (session 23)
             "int4 int8-act, no prefetch": lambda x, s, i: m.quant_linear(x, *w4[s][i].pack(), None, bf, 1),
             "int8 int8-act": lambda x, s, i: m.quant_linear(x, *w8[s][i].pack(), None, bf, 1)}
    if not m.quant_linear_vnni_supported():
        kinds = {k: v for k, v in kinds.items() if "integer" not in k and "int8-act" not in k}
    res = {}
    try:
        for rows in (1, 2, 4, 8, 16, 64, 256):
            xs = {s: torch.randn(rows, k) for s, (n, k) in shapes.items()}
            res[rows] = {}
            for kind, fn in kinds.items():
                m.set_quant_vnni_max_rows(1 << 30 if "integer" in kind else 0)
                m.set_quant_prefetch(0 if "no prefetch" in kind else 1024)
                best = float("inf")
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    for i in range(layers):
                        for s in shapes:
                            fn(xs[s], s, i)
                    best = min(best, time.perf_counter() - t0)
                res[rows][kind] = best * 1e3
            print(f"  M={rows:>3}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in res[rows].items()), flush=True)
    finally:
        m.set_quant_vnni_max_rows(4)
        m.set_quant_prefetch(1024)
    return res


def decode_latency(tokens: int = 128) -> dict:
    from pagedserve import SamplingParams
    from pagedserve.model.loader import resolve_model

    res = {}
    sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for label, model, dtype, act in (("float32", str(resolve_model(None)), "float32", "auto"),
                                     ("bf16", str(resolve_model(None)), "bfloat16", "auto"),
                                     ("GGUF Q4_1, bf16 act.", None, "auto", "float"),
                                     ("GGUF Q4_1 (default: int8 act. where VNNI)", None, "auto", "auto")):
        llm = _llm(model, dtype=dtype, activation_dtype=act)
        llm.generate([PROMPTS[0]], sp, use_tqdm=False)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            llm.generate([PROMPTS[0]], sp, use_tqdm=False)
            best = min(best, (time.perf_counter() - t0) / tokens)
        res[label] = best * 1e3
        print(f"  offline c=1 {label}: {res[label]:.2f} ms/token", flush=True)
        del llm
        gc.collect()
    return res


def report(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    acc = results["accuracy"]
    gguf = acc["_gguf_file_bytes"]
    t = Table(title=f"quantized weights, SmolLM2-135M ({results['machine']}, {results['date']})")
    for c in ("variant", "perplexity", "vs float32", "top-1 agree", "greedy agree", "weights MiB", "x GGUF file"):
        t.add_column(c)
    for label, r in acc.items():
        if label.startswith("_"):
            continue
        t.add_row(label, f"{r['perplexity']:.3f}", f"{r['ppl_delta_pct']:+.2f}%", f"{r['top1_agreement_pct']:.1f}%",
                  f"{r['greedy_agreement_pct']:.1f}%", f"{r['weight_bytes'] / 2**20:.0f}",
                  f"{r['weight_bytes'] / gguf:.2f}")
    Console().print(t)
    k = Table(title=f"30 layers of projections, ms (lower is better; {results.get('kernels_date', results['date'])})")
    kinds = list(next(iter(results["kernels"].values())))
    k.add_column("M")
    for c in kinds:
        k.add_column(c)
    for rows, r in results["kernels"].items():
        k.add_row(str(rows), *(f"{r[c]:.2f}" for c in kinds))
    Console().print(k)
    print("offline c=1 ms/token: " + ", ".join(f"{a} {b:.2f}" for a, b in results["decode_ms_per_token"].items()))
    kq = results.get("kquants")
    if kq:
        print(f"{kq['file']} ({kq['file_bytes'] / 2**20:.1f} MiB; tensors {kq['tensor_types']}), {kq['date']}:")
        for label in ("float32 copy", "kept quantized"):
            r = kq[label]
            print(f"  {label:>15}: ppl {r['perplexity']:.3f} ({r['ppl_delta_pct']:+.2f}%), top-1 "
                  f"{r['top1_agreement_pct']:.1f}%, greedy {r['greedy_agreement_pct']:.1f}%, weights "
                  f"{r['weight_bytes'] / 2**20:.0f} MiB = {r['weight_bytes'] / kq['file_bytes']:.2f}x the file "
                  f"({r['weights']})")
    sm = results.get("second_model")
    if sm:
        tr = sm["_trained"]
        print(f"second model (benchmarks/second_model.py: a {tr['config']['num_hidden_layers']}-layer Llama trained here "
              f"{tr['minutes']:.0f} min, {tr['tokens_seen'] / 1e6:.1f}M tokens seen), {sm['date']}:")
        for title, rows in (("the fixed eval text", sm), ("held-out text of its own kind", sm.get("_heldout", {}))):
            print(f" on {title}:")
            for label, r in rows.items():
                if not label.startswith("_") and label not in ("date", "files"):
                    print(f"  {label:>22}: ppl {r['perplexity']:.3f} ({r['ppl_delta_pct']:+.2f}%), top-1 "
                          f"{r['top1_agreement_pct']:.1f}%, greedy {r['greedy_agreement_pct']:.1f}%, weights "
                          f"{r['weight_bytes'] / 2**20:.1f} MiB ({r['weights']})")


def plot(results: dict):
    plt = pyplot()
    sm = {k: v for k, v in results.get("second_model", {}).items() if not k.startswith("_") and k != "date"}
    fig, axes = plt.subplots(1, 3 if sm else 2, figsize=(19 if sm else 13, 4.5))
    a, b = axes[0], axes[-1]
    for ax, acc, title in ((a, results["accuracy"], "default model (its Q4_1 dequantized)"),
                           (axes[1] if sm else None, sm, "second model (float, trained here)")):
        if ax is None:
            continue
        acc = {k: v for k, v in acc.items() if not k.startswith("_")}
        ax.barh(list(acc), [v["ppl_delta_pct"] for v in acc.values()], color="tab:blue")
        ax.set_xlabel("perplexity vs float32 weights (%), fixed text")
        ax.invert_yaxis()
        ax.set_title(f"accuracy: {title}")
    rows = [int(r) for r in results["kernels"]]
    for kind in next(iter(results["kernels"].values())):
        b.plot(rows, [results["kernels"][str(r)][kind] for r in rows], "o-", label=kind)
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("batch rows M")
    b.set_ylabel("ms for 30 layers of projections")
    b.set_title("quantized vs float GEMMs")
    b.legend(fontsize=8)
    return fig


def kquant_file() -> Path:
    """The default model as Q4_K_M, made by llama.cpp's quantizer through llama-cpp-python's ctypes
    declarations (libllama.so comes with peers.py's llama-server build; no binary of its own)."""
    import ctypes
    import os
    import sys
    import types

    from peers import PEERS, install_llamacpp

    server, f32 = install_llamacpp()
    out = PEERS / "smollm2-135m-q4_k_m.gguf"
    if out.exists():
        return out
    os.environ["LLAMA_CPP_LIB_PATH"] = str(server.parent)
    sys.path.insert(0, str(PEERS / "llama_cpp_python-0.3.36"))
    stub = sys.modules.setdefault("diskcache", types.ModuleType("diskcache"))  # imported by the package, unused
    stub.Cache = getattr(stub, "Cache", object)
    import llama_cpp.llama_cpp as L

    p = L.llama_model_quantize_default_params()
    p.ftype, p.nthread = L.LLAMA_FTYPE_MOSTLY_Q4_K_M, 2
    if L.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(p)) != 0:
        raise RuntimeError("llama_model_quantize failed")
    return out


def kquants() -> dict:
    from gguf import GGUFReader

    from pagedserve.model.loader import resolve_model

    path = kquant_file()
    types = {}
    for t in GGUFReader(path).tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    res = {"file": path.name, "file_bytes": path.stat().st_size, "tensor_types": types}
    res.update(compare([("float32 copy", str(resolve_model(str(path))), {"dtype": "float32"}),
                        ("kept quantized", str(path), {"dtype": "float32"})]))
    return res


def second_model(workdir: Path) -> dict:
    """The accuracy table on the float Llama that benchmarks/second_model.py trained here (the
    default model exists only as Q4_1): float32 weights, then each `pagedserve quantize` method in
    groups of 32, then float32 weights with int8 / fp8 KV caches."""
    from second_model import OUT as folder
    from second_model import heldout_text

    if not (folder / "model.safetensors").exists():
        raise SystemExit(f"no second model at {folder}: run `python benchmarks/second_model.py` first")
    from pagedserve.model.quantization.quantize import quantize_model

    made = {m: str(quantize_model(str(folder), m, workdir / m, group_size=32)) for m in ("int8", "int4-rtn", "gptq", "awq")}
    variants = [("float32", str(folder), {"dtype": "float32"}),
                ("int8 (W8A16)", made["int8"], {"dtype": "float32"}),
                ("int4-rtn g32 (W4A16)", made["int4-rtn"], {"dtype": "float32"}),
                ("GPTQ g32", made["gptq"], {"dtype": "float32"}),
                ("AWQ g32", made["awq"], {"dtype": "float32"}),
                ("float32 + int8 KV", str(folder), {"dtype": "float32", "kv_cache_dtype": "int8"}),
                ("float32 + fp8 KV", str(folder), {"dtype": "float32", "kv_cache_dtype": "fp8"})]
    res = compare(variants)
    text, files = heldout_text()
    print("  on held-out text of its own kind:", flush=True)
    res["_heldout"] = {"files": files, **compare(variants, text)}
    train = json.loads((folder / "train_log.json").read_text())
    res["_trained"] = {k: train[k] for k in ("date", "seed", "minutes", "steps", "tokens_seen", "corpus_tokens",
                                             "eval_text_perplexity", "config")}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-json", action="store_true")
    ap.add_argument("--kquants", action="store_true")
    ap.add_argument("--second-model", action="store_true",
                    help="the accuracy table on benchmarks/second_model.py's float Llama (merged into the JSON)")
    ap.add_argument("--accuracy-only", action="store_true", help="re-measure the accuracy table only (merged into the JSON)")
    ap.add_argument("--kernels-only", action="store_true", help="re-measure the kernel table only (merged into the JSON)")
    args = ap.parse_args()
    if args.from_json:
        return finish(json.loads(OUT.read_text()), OUT, report, plot, save=False)
    if args.kquants:
        results = json.loads(OUT.read_text())
        results["kquants"] = {"date": time.strftime("%Y-%m-%d %H:%M"), **kquants()}
        return finish(results, OUT, report, plot)
    if args.second_model:
        results = json.loads(OUT.read_text())
        with tempfile.TemporaryDirectory() as tmp:
            results["second_model"] = {"date": time.strftime("%Y-%m-%d %H:%M"), **second_model(Path(tmp))}
        return finish(results, OUT, report, plot)
    if args.kernels_only:
        results = json.loads(OUT.read_text())
        results.update(machine=machine(), kernels_date=time.strftime("%Y-%m-%d %H:%M"))
        results["kernels"] = json.loads(json.dumps(kernels()))
        return finish(results, OUT, report, plot)
    if args.accuracy_only:
        results = json.loads(OUT.read_text())
        results.update(machine=machine(), date=time.strftime("%Y-%m-%d %H:%M"))
        with tempfile.TemporaryDirectory() as tmp:
            results["accuracy"] = accuracy(Path(tmp))
        return finish(results, OUT, report, plot)
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    with tempfile.TemporaryDirectory() as tmp:
        print("== accuracy and memory", flush=True)
        results["accuracy"] = accuracy(Path(tmp))
    print("== kernels", flush=True)
    results["kernels"] = kernels()
    print("== offline c=1 decode", flush=True)
    results["decode_ms_per_token"] = decode_latency()
    results = json.loads(json.dumps(results))  # int keys -> str, as read back
    finish(results, OUT, report, plot)


if __name__ == "__main__":
    main()
