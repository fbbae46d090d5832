"""Everything the GPU path still owes a GPU (issues 27 and 29), as one prepared run for the rare
session that is lent one: each phase guarded (a failure is recorded, the next phase runs), saved
as it ends, skipped when the time budget is spent. Highest value first:

  ceilings     the device-to-device copy rate (read + write bytes / time) and the bf16 matmul rate
               (8192^3): the roofs below are these, measured in the same run
  decode       the Llama-3.1-8B shape, --load-format dummy, bf16, CUDA graphs: batch 1 ms/token
               against (weight bytes read + KV bytes) / copy rate (target >= 70%), the same with
               --enforce-eager; batch 256 at ~1k context: linear FLOPs per step / step time against
               the matmul rate (target >= 50%; the whole step's time, so a lower bound)
  planner      decode tok/s at batch 1-256 against `plan --measure`'s prediction on this GPU
               (issue 29: +-25%)
  offline      1,000 requests, prompt U[32,1024], output U[32,512], ignore_eos, on the 8B shape: out
               tok/s against HF transformers' generate with static batching (the first 128 requests,
               batches of 64, same GPU; target >= 5x) and against the catalog H200 plan (within 1.5x)
  kernels      benchmarks/gpu_attention.py: paged decode against HBM (target >= 80% at 64 x 2k)
  correctness  scripts/check_cuda.py on tiny random models: parity, graphs == eager, preemption, ...

    python benchmarks/gpu_session.py --tokenizer DIR [--out DIR] [--budget-s 540] [--phases ...]
    python benchmarks/gpu_session.py --tokenizer DIR --dry-run     # every phase's code on this CPU, tiny

(The dry run also runs the graph runner's static buffers and padding, eagerly, with the Triton
kernels in the interpreter: everything of the graphs phase but the capture.)

DIR holds tokenizer.json / tokenizer_config.json (any: the dummy models' outputs are never read as
text; the default model's converted folder works). Writes gpu_session.json (+ .png) in --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PHASES = ("ceilings", "decode", "planner", "offline", "kernels", "correctness")
EIGHT_B = "llama-3-8b"  # planner/known_models.yaml: the Llama-3.1-8B shape
PLANNER_BATCHES = (1, 8, 32, 64, 128, 256)


def write_model(out: Path, known: str, tokenizer: Path, dry: bool) -> Path:
    """A config-only model folder of a published shape (dry run: a miniature of it) + tokenizer."""
    import yaml

    shape = dict(yaml.safe_load((ROOT / "pagedserve/planner/known_models.yaml").read_text())[known])
    if dry:
        shape.update(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                     num_key_value_heads=2, vocab_size=4096)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "hidden_act": "silu", **shape}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in tokenizer.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, out / f.name)
    return out


class Session:
    def __init__(self, args):
        import torch

        self.args, self.torch = args, torch
        self.cuda = not args.dry_run
        self.dev = "cuda" if self.cuda else "cpu"
        self.t0 = time.monotonic()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.res = {"date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": args.dry_run, "phases": {}}
        if self.cuda:
            self.res["device"] = torch.cuda.get_device_name(0)
            self.res["torch"] = torch.__version__
        self.work = Path(tempfile.mkdtemp(prefix="gpu_session-"))  # model folders: not in --out (files come back)
        self.model_dir = write_model(self.work / EIGHT_B, EIGHT_B, Path(args.tokenizer), args.dry_run)

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def save(self) -> None:
        (self.out / "gpu_session.json").write_text(json.dumps(self.res, indent=1, default=str))

    def run(self, phases) -> None:
        for name in phases:
            if self.left() < 30:
                self.res["phases"][name] = {"skipped": "time budget spent"}
                print(f"[{name}] skipped: {self.left():.0f}s left", flush=True)
                continue
            t = time.monotonic()
            print(f"[{name}] start ({self.left():.0f}s left)", flush=True)
            try:
                self.res["phases"][name] = getattr(self, name)()
            except Exception as e:  # recorded, and the next phase runs
                self.res["phases"][name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
                traceback.print_exc()
            self.res["phases"][name]["seconds"] = round(time.monotonic() - t, 1)
            print(f"[{name}] {json.dumps(self.res['phases'][name], default=str)[:1500]}", flush=True)
            self.save()
            self.free()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def _time(self, fn, reps: int) -> float:
        fn()
        self.sync()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - t)
        return best

    # -- phases --------------------------------------------------------------------------------
    def ceilings(self) -> dict:
        torch = self.torch
        n = (2 << 30) // 2 if self.cuda else (64 << 20) // 2  # bf16 elements: 2 GiB (dry: 64 MiB)
        a = torch.empty(n, dtype=torch.bfloat16, device=self.dev)
        b = torch.empty_like(a)
        copy = 2 * n * 2 / self._time(lambda: b.copy_(a), 10)
        del a, b
        m = 8192 if self.cuda else 512
        x, y = (torch.randn(m, m, dtype=torch.bfloat16, device=self.dev) for _ in range(2))
        mm = 2 * m**3 / self._time(lambda: x @ y, 10)
        self.ceil = {"copy_bytes_per_s": copy, "bf16_matmul_flops": mm}
        return {"copy_TBps": copy / 1e12, "bf16_matmul_TFLOPs": mm / 1e12}

    def _llm(self, **kw):
        from pagedserve import LLM

        base = dict(load_format="dummy", dtype="bfloat16" if self.cuda else "float32", device=self.dev,
                    max_model_len=4096 if self.cuda else 512, max_num_seqs=256)
        if not self.cuda:
            base["kv_cache_memory"] = 256 << 20
        return LLM(str(self.model_dir), **{**base, **kw})

    def _decode_window(self, llm, batch: int, prompt: int, steps: int) -> tuple[float, float]:
        """(seconds per decode step, average context) with `batch` requests of `prompt` tokens decoding."""
        from pagedserve.bench.decoding import decode_window, start_decoding, stop_decoding

        eng = llm.engine
        ids = start_decoding(eng, batch, prompt, steps + 64, (100, min(49000, eng.arch.vocab_size - 1)))
        dt, ctx = decode_window(eng, steps, self.sync)
        stop_decoding(eng, ids)
        return dt, ctx

    def _bytes_per_token(self, llm, ctx: float) -> float:
        """What a batch-1 decode step must read: every weight once but the embedding table (one row
        of it), plus the context's K/V."""
        r = llm.engine.runner
        emb = r.model.embed_tokens.weight
        tied = r.model.lm_head.weight is emb
        weights = r.weight_bytes - (0 if tied else emb.numel() * emb.element_size()) + emb.shape[1] * emb.element_size()
        kv = r.kv_bytes / (r.num_blocks * r.block_size)  # bytes per token of cache
        return weights + kv * ctx

    def decode(self) -> dict:
        steps = 64 if self.cuda else 2  # dry run: Triton's interpreter takes ~0.2-0.8 s a step
        out = {}
        for eager in (False, True):
            if self.cuda or eager:  # graphs: only the sizes measured (each capture costs device time)
                llm = self._llm(enforce_eager=eager, **({} if eager else {"cuda_graph_sizes": [1, 256]}))
            else:  # dry run: the graph runner's static buffers and padding, run eagerly (tests/test_cuda_graphs.py)
                llm = self._llm(attention_backend="triton")
                llm.engine.runner.use_decode_graphs([1, 2, 4, 8], capture=False)
            key = "eager" if eager else "graphs"
            g = llm.engine.runner.graphs
            dt, ctx = self._decode_window(llm, 1, 512 if self.cuda else 12, steps)
            need = self._bytes_per_token(llm, ctx)
            out[f"batch1_{key}"] = {"ms_per_token": dt * 1e3, "context": ctx, "bytes": need,
                                    "hbm_fraction": need / self.ceil["copy_bytes_per_s"] / dt,
                                    "graph_sizes": None if g is None else len(g.sizes),
                                    "capture_s": None if g is None else g.capture_seconds,
                                    "replayed_steps": None if g is None else g.replays}
            if not eager:  # the same with a step in flight (--async-scheduling): host work beside the device's
                llm.engine.cfg.async_scheduling = True
                dt, ctx = self._decode_window(llm, 1, 512 if self.cuda else 12, steps)
                llm.engine.cfg.async_scheduling = False
                out["batch1_graphs_async"] = {"ms_per_token": dt * 1e3, "context": ctx,
                                              "hbm_fraction": self._bytes_per_token(llm, ctx) / self.ceil["copy_bytes_per_s"] / dt}
                batch = 256 if self.cuda else 3  # dry run: padded to 4
                dt, ctx = self._decode_window(llm, batch, 1000 if self.cuda else 10, max(steps // 2, 1))
                m = llm.engine.runner.model
                linear = sum(p.numel() for n, p in m.named_parameters() if n.endswith("proj.weight"))
                linear += m.lm_head.weight.numel()
                flops = 2 * batch * linear
                out[f"batch{batch}_graphs"] = {"ms_per_step": dt * 1e3, "context": ctx, "linear_flops": flops,
                                               "matmul_fraction": flops / dt / self.ceil["bf16_matmul_flops"]}
            del llm
            self.free()
        return out

    def planner(self) -> dict:
        from pagedserve.planner.plan import Plan, PlanInputs, Workload
        from pagedserve.planner.specs import load_model_spec, measure_this_machine

        spec = load_model_spec(str(self.model_dir / "config.json"))
        hw = measure_this_machine(spec)
        llm = self._llm(**({"cuda_graph_sizes": list(PLANNER_BATCHES)} if self.cuda else {}))
        rows = []
        batches = PLANNER_BATCHES if self.cuda else (1, 4)
        for b in batches:
            if self.left() < 20:
                break
            dt, ctx = self._decode_window(llm, b, 128, 24 if self.cuda else 3)
            plan = Plan(PlanInputs(model=spec, hw=hw, weight_dtype="bf16" if self.cuda else "fp32", max_model_len=4096,
                                   workload=Workload(input_tokens=128, output_tokens=16)))
            pred = plan.step_time(b, context=ctx)["tokens_per_s"]
            rows.append({"batch": b, "measured_tok_s": b / dt, "predicted_tok_s": pred, "error": pred * dt / b - 1})
        del llm
        return {"rows": rows, "within_25pct": all(abs(r["error"]) <= 0.25 for r in rows),
                "measured_hw": {k: v for k, v in hw.measured.items() if not isinstance(v, list)}}

    def offline(self) -> dict:
        import torch

        from pagedserve import SamplingParams
        from pagedserve.bench.workload import synthetic_workload
        from pagedserve.planner.plan import Plan, PlanInputs, Workload
        from pagedserve.planner.specs import get_hardware, load_model_spec

        n = 1000 if self.cuda else 12
        reqs = synthetic_workload(n, (32, 1024) if self.cuda else (8, 64), (32, 512) if self.cuda else (4, 16),
                                  (100, 49000 if self.cuda else 4000), seed=0)
        llm = self._llm()
        params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
        prompts = [r.prompt_token_ids for r in reqs]
        llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm
        self.sync()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=True)
        self.sync()
        ours_s = time.perf_counter() - t
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        del llm, outs
        self.free()
        # HF transformers, the same shape with its own random weights, static batches padded left
        from transformers import AutoModelForCausalLM, LlamaConfig

        cfg = LlamaConfig(**json.loads((self.model_dir / "config.json").read_text()))
        with torch.device(self.dev):
            hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if self.cuda else torch.float32).eval()
        sub, bsz = (128, 64) if self.cuda else (4, 2)
        hf_tokens, t = 0, time.perf_counter()
        for i in range(0, sub, bsz):
            batch = reqs[i:i + bsz]
            width = max(len(r.prompt_token_ids) for r in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(batch):
                ids[j, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
                mask[j, width - len(r.prompt_token_ids):] = 1
            new = max(r.max_tokens for r in batch)
            with torch.no_grad():
                hf.generate(ids.to(self.dev), attention_mask=mask.to(self.dev), max_new_tokens=new, min_new_tokens=new,
                            do_sample=False, pad_token_id=0)
            hf_tokens += sum(r.max_tokens for r in batch)  # the tokens asked for; the padding's are waste
        self.sync()
        hf_s = time.perf_counter() - t
        del hf
        spec = load_model_spec(str(self.model_dir / "config.json"))
        avg_in = statistics.mean(len(r.prompt_token_ids) for r in reqs)
        avg_out = statistics.mean(r.max_tokens for r in reqs)
        plan = Plan(PlanInputs(model=spec, hw=get_hardware("H200"), max_model_len=2048,
                               workload=Workload(kind="batch", input_tokens=round(avg_in), output_tokens=round(avg_out))))
        predicted = plan.capacity["output_tok_s_per_replica"]
        ours = out_tokens / ours_s
        return {"requests": n, "ours_out_tok_s": ours, "ours_seconds": ours_s, "hf_out_tok_s": hf_tokens / hf_s,
                "hf_requests": sub, "hf_batch": bsz, "vs_hf": ours / (hf_tokens / hf_s),
                "planner_H200_out_tok_s": predicted, "planner_ratio": predicted / ours}

    def kernels(self) -> dict:
        if not self.cuda:
            return {"skipped": "needs CUDA (dry run)"}
        import subprocess

        r = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_attention.py")], capture_output=True, text=True,
                           timeout=max(30, self.left() - 10), cwd=ROOT)
        res = ROOT / "benchmarks/results/gpu_attention.json"
        return {"rc": r.returncode, "tail": r.stdout[-2500:] + r.stderr[-1500:],
                "result": json.loads(res.read_text()) if res.exists() else None}

    def correctness(self) -> dict:
        if not self.cuda:
            return {"skipped": "needs CUDA (dry run)"}
        import subprocess

        from pagedserve.testing import make_tiny_model

        dirs = [str(make_tiny_model(self.work / k, k, tokenizer_from=Path(self.args.tokenizer)))
                for k in ("llama3", "qwen2")]
        r = subprocess.run([sys.executable, str(ROOT / "scripts/check_cuda.py"), *dirs], capture_output=True, text=True,
                           timeout=max(30, self.left() - 10), cwd=ROOT)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("PASS", "FAIL", "     "))]
        return {"rc": r.returncode, "lines": lines, "stderr_tail": r.stderr[-2000:]}


def plot(res: dict, path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_common import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    dec = res["phases"].get("decode", {})
    bars = {k: v.get("hbm_fraction", v.get("matmul_fraction")) for k, v in dec.items() if isinstance(v, dict)}
    axes[0].bar(list(bars), [v or 0 for v in bars.values()])
    axes[0].axhline(0.7, ls="--", c="k", lw=0.8)
    axes[0].set(title="decode: fraction of the roof (batch 1: HBM; 256: matmul)", ylim=(0, 1))
    rows = res["phases"].get("planner", {}).get("rows", [])
    if rows:
        b = [r["batch"] for r in rows]
        axes[1].loglog(b, [r["measured_tok_s"] for r in rows], "o-", label="engine")
        axes[1].loglog(b, [r["predicted_tok_s"] for r in rows], "s--", label="planner --measure")
        axes[1].legend()
    axes[1].set(title="decode tok/s vs batch", xlabel="batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json (and tokenizer_config.json)")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks/results/gpu_session")))
    ap.add_argument("--budget-s", type=float, default=540, help="stop starting phases after this long")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    ap.add_argument("--dry-run", action="store_true", help="this CPU, miniature shapes: checks the script itself")
    args = ap.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    bad = sorted(set(phases) - set(PHASES))
    if bad:
        ap.error(f"unknown phases {bad}")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA device here: use --dry-run to check the script on a CPU")
    s = Session(args)
    s.run(["ceilings"] + [p for p in phases if p != "ceilings"])  # the roofs every other phase divides by
    plot(s.res, Path(args.out) / "gpu_session.png")
    failed = [n for n, p in s.res["phases"].items() if "error" in p]
    print(f"done in {time.monotonic() - s.t0:.0f}s; phases with errors: {failed or 'none'}; "
          f"wrote {Path(args.out) / 'gpu_session.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
