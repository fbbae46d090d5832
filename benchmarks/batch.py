"""Batches (issue 26): `pagedserve run-batch` against `LLM.generate`, and a batch that survives
kill -9 of its server.

    python benchmarks/batch.py throughput [--pairs 2]   # the default workload, same-run pairs
    python benchmarks/batch.py crash [--lines 300]      # kill -9 at 30%, 60%, 90%, restart each time
    python benchmarks/batch.py mixed [--rounds 3]       # chat at c=8 alone, a batch alone, then both

throughput: the 128-request default workload (token-id prompts, ignore_eos, greedy) through
`run-batch` (the server's app in-process, completions endpoint) and through `LLM.generate`, each a
fresh process with the same engine flags, in alternating order; out tokens/s with the model load
excluded (run-batch logs it so). Target: run-batch >= 0.95x LLM.generate.

crash: a real `pagedserve serve --batch-dir` on the default model runs a batch of --lines lines;
at 30%, 60% and 90% of them done the server is killed with SIGKILL and started again on the same
directory. Checked at the end: every custom_id in the output exactly once, and each line that had
a committed result before a kill still has that same result (not redone).

mixed: one server on the default model with --batch-dir; after a warm-up round, --rounds times:
chat at concurrency 8 (`pagedserve bench`, --chat-requests requests, prompts 32-512 and outputs
32-256 tokens) alone; then a --lines-line batch (short chat lines, 64 tokens each) alone for
--window seconds (its out tokens/s from vllm:generation_tokens); then the same chat load beside the
still-running batch, which is then cancelled. Targets (the medians over rounds; each round's ratios
against its own chat-alone phase): chat TTFT p99 <= 1.5x and ITL p50 <= 1.3x of chat alone, and
the batch's out tokens/s beside chat >= 70% of (its rate alone - chat's rate alone).

Writes results/batch.json and results/batch.png.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from bench_common import finish, machine, pyplot  # noqa: E402

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "batch.json"
ENGINE_FLAGS = ["--max-model-len", "2048", "--kv-cache-memory", "2GiB"]

GENERATE = """
import json, sys, time
from pagedserve import LLM, SamplingParams
rows = [json.loads(x) for x in open(sys.argv[1])]
llm = LLM(None, max_model_len=2048, kv_cache_memory=2 << 30)
params = [SamplingParams(temperature=0, max_tokens=r["body"]["max_tokens"], ignore_eos=True) for r in rows]
t0 = time.perf_counter()
outs = llm.generate([r["body"]["prompt"] for r in rows], params, use_tqdm=False)
wall = time.perf_counter() - t0
print(json.dumps({"tokens": sum(len(o.outputs[0].token_ids) for o in outs), "wall_s": wall}))
"""


def workload_file(path: Path) -> int:
    from pagedserve.bench.workload import synthetic_workload

    reqs = synthetic_workload(seed=0)
    with open(path, "w") as f:
        for i, r in enumerate(reqs):
            f.write(json.dumps({"custom_id": f"w{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"model": "m", "prompt": list(r.prompt_token_ids), "max_tokens": r.max_tokens,
                                         "temperature": 0, "ignore_eos": True}}) + "\n")
    return len(reqs)


def run_generate(src: Path) -> float:
    p = subprocess.run([sys.executable, "-c", GENERATE, str(src)], capture_output=True, text=True, timeout=1800)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return r["tokens"] / r["wall_s"]


def run_batch(src: Path, out: Path) -> float:
    p = subprocess.run([sys.executable, "-m", "pagedserve.cli", "run-batch", "-i", str(src), "-o", str(out),
                        "--served-model-name", "m", "--no-progress", *ENGINE_FLAGS],
                       capture_output=True, text=True, timeout=1800)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    m = re.search(r"\(([\d.]+) out tok/s, model load excluded\)", p.stderr)
    return float(m.group(1))


def throughput(pairs: int) -> dict:
    rounds = []
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in.jsonl"
        n = workload_file(src)
        for i in range(pairs):
            order = ["run-batch", "generate"] if i % 2 == 0 else ["generate", "run-batch"]
            r = {"first": order[0]}
            for which in order:
                r[which] = run_batch(src, Path(d) / "out.jsonl") if which == "run-batch" else run_generate(src)
                print(f"round {i + 1}/{pairs} {which}: {r[which]:.1f} out tok/s", flush=True)
            r["ratio"] = r["run-batch"] / r["generate"]
            rounds.append(r)
    ratios = sorted(r["ratio"] for r in rounds)
    return {"requests": n, "rounds": rounds, "median_ratio": ratios[len(ratios) // 2] if len(ratios) % 2 else
            (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2}


def crash(lines: int) -> dict:
    import openai
    from server_utils import ServerProcess

    rows = [{"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "m", "messages": [{"role": "user", "content": f"Summarize document {i} in one line."}],
                      "max_tokens": 24 + i % 24, "temperature": 0, "ignore_eos": True}} for i in range(lines)]
    kills = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        args = ["--served-model-name", "m", *ENGINE_FLAGS, "--batch-dir", str(d / "batches")]
        s = ServerProcess(args, d / "s1.log")
        c = openai.OpenAI(base_url=s.base, api_key="none", max_retries=0)
        f = c.files.create(file=("docs.jsonl", io.BytesIO("".join(json.dumps(r) + "\n" for r in rows).encode())),
                           purpose="batch")
        bid = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id
        t0 = time.monotonic()
        kept: dict[int, str] = {}
        for k, frac in enumerate((0.3, 0.6, 0.9), start=2):
            while c.batches.retrieve(bid).request_counts.completed < frac * lines:
                time.sleep(0.05)
            s.proc.send_signal(signal.SIGKILL)
            s.proc.wait()
            s.log.close()
            with sqlite3.connect(d / "batches" / "batches.db") as db:
                done = dict(db.execute("SELECT line, result FROM batch_lines WHERE batch_id = ?", (bid,)).fetchall())
            kills.append({"at": frac, "committed": len(done), "earlier_unchanged": all(kept[i] == done[i] for i in kept),
                          "t_s": time.monotonic() - t0})
            print(f"kill -9 at {frac:.0%}: {len(done)} lines committed", flush=True)
            kept = done
            s = ServerProcess(args, d / f"s{k}.log")
            c = openai.OpenAI(base_url=s.base, api_key="none", max_retries=0)
        while (b := c.batches.retrieve(bid)).status not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.2)
        out = c.files.content(b.output_file_id).text.splitlines() if b.output_file_id else []
        s.stop()
    ids = [json.loads(x)["custom_id"] for x in out]
    return {"lines": lines, "status": b.status, "kills": kills, "output_lines": len(out),
            "each_custom_id_once": sorted(ids) == sorted(r["custom_id"] for r in rows),
            "kept_results_unchanged": all(json.loads(out[i]) == json.loads(kept[i]) for i in kept),
            "wall_s": time.monotonic() - t0}


def _metric(url: str, name: str) -> float:
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def _gen_tokens(url: str) -> float:
    return _metric(url, "vllm:generation_tokens_total")


def mixed(chat_requests: int, lines: int, window_s: float, extra: list[str], rounds: int = 3) -> dict:
    """Chat at concurrency 8 alone, then a batch alone, then both, `rounds` times on one server:
    chat TTFT p99 / ITL p50 against chat alone in the same round, and the batch's out tok/s beside
    chat against what is left of its own rate; the medians over rounds are the result (this shared
    box drifts between phases by more than the targets' margins)."""
    import argparse as ap_
    import statistics

    import openai
    from server_utils import ServerProcess

    from pagedserve.bench import cli as bench
    from pagedserve.server.metrics import CPU_THREADS

    def chat(port_url: str) -> dict:
        a = ap_.Namespace(base_url=f"{port_url}/v1", model="m", api_key=None, concurrency=[8], request_rate=None,
                          num_requests=chat_requests, prompt_len=[32, 512], output_len=[32, 256], seed=7,
                          timeout=600.0, label="chat", out=os.devnull)
        return asyncio.run(bench.bench(a))[0]

    def batch_file(c, round_: int):  # distinct prompts each round: no prefix-cache hits from the last
        rows = [{"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "m", "messages": [{"role": "user", "content": f"Summarize document {i}.{round_} in one line."}],
                          "max_tokens": 64, "temperature": 0, "ignore_eos": True}} for i in range(lines)]
        data = io.BytesIO("".join(json.dumps(r) + "\n" for r in rows).encode())
        return c.files.create(file=("docs.jsonl", data), purpose="batch")

    keys = ("ttft_p99", "itl_p50", "output_tok_s")
    out = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        s = ServerProcess(["--served-model-name", "m", *ENGINE_FLAGS, "--batch-dir", str(d / "b"), *extra], d / "s.log")
        try:
            c = openai.OpenAI(base_url=s.base, api_key="none", max_retries=0)
            chat(s.url)  # warm-up: first requests compile and fault in what they touch
            for i in range(rounds):
                f = batch_file(c, i)
                alone = chat(s.url)
                threads = {"chat_alone": _metric(s.url, CPU_THREADS)}  # the tuner's choice as each phase ends
                b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
                time.sleep(5)  # the batch ramps up
                g0, t0 = _gen_tokens(s.url), time.monotonic()
                time.sleep(window_s)
                batch_alone = (_gen_tokens(s.url) - g0) / (time.monotonic() - t0)
                threads["batch_alone"] = _metric(s.url, CPU_THREADS)
                g0, t0 = _gen_tokens(s.url), time.monotonic()
                both = chat(s.url)
                threads["beside"] = _metric(s.url, CPU_THREADS)
                total = (_gen_tokens(s.url) - g0) / (time.monotonic() - t0)
                batch_beside = total - both["output_tokens"] / (time.monotonic() - t0)
                c.batches.cancel(b.id)
                while c.batches.retrieve(b.id).status == "cancelling":  # its lines in flight end first
                    time.sleep(0.5)
                left = batch_alone - alone["output_tok_s"]
                r = {"chat_alone": {k: alone[k] for k in keys}, "chat_beside_batch": {k: both[k] for k in keys},
                     "batch_alone_tok_s": batch_alone, "batch_beside_chat_tok_s": batch_beside,
                     "ttft_p99_ratio": both["ttft_p99"] / alone["ttft_p99"],
                     "itl_p50_ratio": both["itl_p50"] / alone["itl_p50"],
                     "batch_share_of_left": batch_beside / left if left > 0 else None, "cpu_threads": threads}
                out.append(r)
                print(f"round {i + 1}: chat alone TTFT p99 {alone['ttft_p99'] * 1e3:.0f} ms, ITL p50 "
                      f"{alone['itl_p50'] * 1e3:.1f} ms, {alone['output_tok_s']:.1f} tok/s; batch alone "
                      f"{batch_alone:.1f} tok/s; beside: TTFT p99 {r['ttft_p99_ratio']:.2f}x, ITL p50 "
                      f"{r['itl_p50_ratio']:.2f}x, batch {batch_beside:.1f} tok/s = "
                      f"{(r['batch_share_of_left'] or 0):.0%} of what is left; threads {threads}", flush=True)
        finally:
            s.stop()
    med = {k: statistics.median(r[k] for r in out) for k in ("ttft_p99_ratio", "itl_p50_ratio",
                                                               "batch_alone_tok_s", "batch_beside_chat_tok_s")}
    shares = [r["batch_share_of_left"] for r in out if r["batch_share_of_left"] is not None]
    return {"chat_requests": chat_requests, "lines": lines, "flags": extra, "rounds": out, **med,
            "chat_alone_tok_s": statistics.median(r["chat_alone"]["output_tok_s"] for r in out),
            "batch_share_of_left": statistics.median(shares) if shares else None}


def report(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    print(f"{res.get('machine')} — {res.get('date')}")
    t = res.get("throughput")
    if t:
        tab = Table(title=f"run-batch vs LLM.generate, {t['requests']} requests (out tok/s)")
        for col in ("round", "first", "run-batch", "LLM.generate", "ratio"):
            tab.add_column(col, justify="right")
        for i, r in enumerate(t["rounds"], 1):
            tab.add_row(str(i), r["first"], f"{r['run-batch']:.1f}", f"{r['generate']:.1f}", f"{r['ratio']:.3f}")
        Console().print(tab)
        print(f"median ratio {t['median_ratio']:.3f} (target >= 0.95)")
    m = res.get("mixed")
    if m and "rounds" in m:
        tab = Table(title=f"mixed load: {m['chat_requests']} chat requests at c=8 beside a {m['lines']}-line batch, "
                          f"flags {' '.join(m['flags']) or 'default'}")
        for col in ("round", "chat alone ITL p50 ms", "TTFT p99 x", "ITL p50 x", "batch beside", "batch alone",
                    "chat alone", "share of left"):
            tab.add_column(col, justify="right")
        for i, r in enumerate(m["rounds"], 1):
            tab.add_row(str(i), f"{r['chat_alone']['itl_p50'] * 1e3:.1f}", f"{r['ttft_p99_ratio']:.2f}",
                        f"{r['itl_p50_ratio']:.2f}", f"{r['batch_beside_chat_tok_s']:.1f}",
                        f"{r['batch_alone_tok_s']:.1f}", f"{r['chat_alone']['output_tok_s']:.1f}",
                        f"{r['batch_share_of_left']:.0%}" if r["batch_share_of_left"] is not None else "-")
        Console().print(tab)
        share = m["batch_share_of_left"]
        print(f"medians: chat TTFT p99 {m['ttft_p99_ratio']:.2f}x (target <= 1.5), ITL p50 {m['itl_p50_ratio']:.2f}x "
              f"(target <= 1.3) of chat alone; batch "
              + (f"{share:.0%} of what is left (target >= 70%)" if share is not None else "nothing left"))
    c = res.get("crash")
    if c:
        for k in c["kills"]:
            print(f"kill -9 at {k['at']:.0%}: {k['committed']} committed, earlier results unchanged: "
                  f"{k['earlier_unchanged']}")
        print(f"crash test: {c['status']}, {c['output_lines']}/{c['lines']} output lines, each custom_id once: "
              f"{c['each_custom_id_once']}, results kept across kills: {c['kept_results_unchanged']}")


def plot(res: dict):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    t = res.get("throughput")
    if t:
        x = range(1, len(t["rounds"]) + 1)
        axes[0].plot(x, [r["run-batch"] for r in t["rounds"]], "o-", label="run-batch")
        axes[0].plot(x, [r["generate"] for r in t["rounds"]], "s-", label="LLM.generate")
        axes[0].set(xlabel="round", ylabel="out tok/s", title=f"median ratio {t['median_ratio']:.3f}", xticks=list(x))
        axes[0].legend()
    c = res.get("crash")
    if c:
        axes[1].bar([f"{k['at']:.0%}" for k in c["kills"]], [k["committed"] for k in c["kills"]])
        axes[1].axhline(c["lines"], color="k", ls="--", label=f"{c['lines']} lines")
        axes[1].set(xlabel="kill -9 at", ylabel="lines committed",
                    title=f"{c['output_lines']} output lines, each once: {c['each_custom_id_once']}")
        axes[1].legend()
    m = res.get("mixed")
    if m and "rounds" in m:
        x = range(1, len(m["rounds"]) + 1)
        axes[2].plot(x, [r["itl_p50_ratio"] for r in m["rounds"]], "o-", label="chat ITL p50 / alone (<= 1.3)")
        axes[2].plot(x, [r["ttft_p99_ratio"] for r in m["rounds"]], "s-", label="chat TTFT p99 / alone (<= 1.5)")
        axes[2].plot(x, [r["batch_share_of_left"] or 0 for r in m["rounds"]], "^-", label="batch / what is left (>= 0.7)")
        for y in (0.7, 1.3, 1.5):
            axes[2].axhline(y, color="grey", ls=":", lw=0.8)
        axes[2].set(xlabel="round", title=f"mixed load, {' '.join(m['flags']) or 'default flags'}", xticks=list(x))
        axes[2].legend(fontsize=7)
    fig.suptitle(f"batches — {res.get('machine')}", fontsize=9)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("throughput", "crash", "mixed", "report"))
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--lines", type=int, default=None, help="crash: 300; mixed: 2000")
    ap.add_argument("--chat-requests", type=int, default=32, help="mixed: chat requests per phase")
    ap.add_argument("--window", type=float, default=20.0, help="mixed: seconds the batch runs alone")
    ap.add_argument("--rounds", type=int, default=3, help="mixed: rounds of chat alone, batch alone, both")
    ap.add_argument("--server-flag", action="append", default=[], help="mixed: extra serve flags (e.g. --batch-share=1)")
    args = ap.parse_args()
    res = json.loads(OUT.read_text()) if OUT.exists() else {}
    if args.mode != "report":
        res.update(machine=machine(), date=time.strftime("%Y-%m-%d %H:%M"))
        if args.mode == "throughput":
            res["throughput"] = throughput(args.pairs)
        elif args.mode == "crash":
            res["crash"] = crash(args.lines or 300)
        else:
            res["mixed"] = mixed(args.chat_requests, args.lines or 2000, args.window, args.server_flag, args.rounds)
    finish(res, OUT, report, plot, save=args.mode != "report")


if __name__ == "__main__":
    main()
