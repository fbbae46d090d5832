"""Structured outputs on the default model: correctness, cost, and cold compiles, in one run.

1. correctness: 200 seeded JSON schemas of increasing nesting (objects, arrays, enums, bounded
   numbers, required fields, anyOf), each asked for at temperature 0 and 1 (offline LLM.chat);
   every output is checked with `jsonschema`.
2. cost: 64 concurrent requests, all with one JSON schema, against the same 64 unconstrained,
   alternating rounds in one process: output tokens/s of each.
3. cold compile: a real server streams unconstrained requests (fixed arrival rate); in one phase
   every 8th request brings a new 20-field schema (a cold compile each). TTFT p99 of the
   unconstrained requests with and without those compiles.

  python benchmarks/structured_outputs.py [--part all|correctness|cost|compile] [--backend auto]
  python benchmarks/structured_outputs.py --from-json     # re-print and re-plot saved results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

from bench_common import finish, machine, pyplot

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "structured_outputs.json"


# -- schemas --------------------------------------------------------------------------------------
WORDS = ["name", "city", "score", "tags", "level", "owner", "items", "color", "size", "status", "price",
         "count", "title", "kind", "note", "rank", "code", "year", "mode", "unit"]


def leaf(rng: random.Random) -> dict:
    k = rng.choice(["string", "integer", "number", "boolean", "enum"])
    if k == "string":
        return {"type": "string", "maxLength": rng.randint(4, 24)}
    if k == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(1, 500)}
    if k == "number":
        lo = rng.randint(-10, 10)
        return {"type": "number", "minimum": lo, "maximum": lo + rng.randint(1, 100)}
    if k == "boolean":
        return {"type": "boolean"}
    return {"enum": rng.sample(["red", "green", "blue", "small", "large", "on", "off", 1, 2, 3], rng.randint(2, 4))}


def schema(rng: random.Random, depth: int) -> dict:
    """An object `depth` levels deep: its properties are leaves, arrays, anyOf, or objects."""
    props, required = {}, []
    for name in rng.sample(WORDS, rng.randint(1, 4)):
        r = rng.random()
        if depth > 1 and r < 0.35:
            props[name] = schema(rng, depth - 1)
        elif r < 0.55:
            item = schema(rng, depth - 1) if depth > 1 and rng.random() < 0.5 else leaf(rng)
            props[name] = {"type": "array", "items": item, "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 4)}
        elif r < 0.65:
            props[name] = {"anyOf": [leaf(rng), leaf(rng)]}
        else:
            props[name] = leaf(rng)
        if rng.random() < 0.7:
            required.append(name)
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def schemas(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [schema(rng, 1 + (4 * i) // n) for i in range(n)]  # depth 1..4 as i grows


def wide_schema(fields: int, salt: int) -> dict:
    """A flat object of `fields` required fields (names salted: every one a cold compile)."""
    rng = random.Random(salt)
    props = {f"f{salt}_{i}": leaf(rng) for i in range(fields)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


# -- 1. correctness -------------------------------------------------------------------------------
def correctness(llm, n: int) -> dict:
    import jsonschema

    from pagedserve import SamplingParams
    from pagedserve.engine.structured_output import StructuredOutputsParams as SO

    res = {}
    ss = schemas(n)
    for temp in (0.0, 1.0):
        convs = [[{"role": "user", "content": "Answer with JSON that matches this schema:\n" + json.dumps(s)}] for s in ss]
        params = [SamplingParams(temperature=temp, seed=i, max_tokens=1024, structured_outputs=SO(json=s))
                  for i, s in enumerate(ss)]
        t0 = time.perf_counter()
        outs = _chat_each(llm, convs, params)
        dt = time.perf_counter() - t0
        valid, lengths, failures = 0, 0, []
        for i, (s, o) in enumerate(zip(ss, outs)):
            c = o.outputs[0]
            try:
                jsonschema.validate(json.loads(c.text), s)
                valid += 1
            except Exception as e:
                failures.append({"i": i, "finish": c.finish_reason, "error": str(e)[:200], "text": c.text[-200:]})
            lengths += c.finish_reason == "length"
        res[f"t{temp:g}"] = {"schemas": n, "valid": valid, "valid_pct": 100 * valid / n, "hit_max_tokens": lengths,
                             "seconds": dt, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                             "failures": failures[:10]}
        print(f"  temperature {temp:g}: {valid}/{n} valid ({lengths} hit max_tokens) in {dt:.0f}s")
    return res


def _chat_each(llm, convs, params):
    from pagedserve.model.tokenizer import apply_chat_template

    tok = llm.get_tokenizer()
    prompts = [apply_chat_template(tok, c) for c in convs]
    return llm.generate(prompts, params, use_tqdm=True)


# -- 2. cost --------------------------------------------------------------------------------------
COST_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 32},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 32},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 6},
        "friends": {"type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                             "since": {"type": "integer", "minimum": 1950, "maximum": 2026}},
            "required": ["name", "since"], "additionalProperties": False}},
    },
    "required": ["name", "age", "city", "hobbies", "friends"],
    "additionalProperties": False,
}


def cost(llm, n: int, rounds: int) -> dict:
    from pagedserve import SamplingParams
    from pagedserve.engine.structured_output import StructuredOutputsParams as SO
    from pagedserve.model.tokenizer import apply_chat_template

    tok = llm.get_tokenizer()
    prompts = [apply_chat_template(tok, [{"role": "user", "content": f"Describe person number {i} as JSON: name, age, "
                                          "city, hobbies and friends."}]) for i in range(n)]
    kinds = {
        "unconstrained": [SamplingParams(temperature=1.0, seed=i, max_tokens=256) for i in range(n)],
        "json_schema": [SamplingParams(temperature=1.0, seed=i, max_tokens=256, structured_outputs=SO(json=COST_SCHEMA))
                        for i in range(n)],
    }
    llm.generate(prompts[:2], kinds["json_schema"][:2], use_tqdm=False)  # warm: compile + first steps
    res: dict[str, list] = {k: [] for k in kinds}
    for r in range(rounds):
        for k, params in kinds.items():
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            toks = sum(len(o.outputs[0].token_ids) for o in outs)
            res[k].append({"seconds": dt, "output_tokens": toks, "tok_s": toks / dt, "load1": os.getloadavg()[0]})
            print(f"  round {r + 1} {k:>14}: {toks} tokens in {dt:.1f}s = {toks / dt:.1f} tok/s (load {os.getloadavg()[0]:.1f})")
    ratio = [c["tok_s"] / u["tok_s"] for c, u in zip(res["json_schema"], res["unconstrained"])]
    return {"requests": n, "rounds": res, "ratio": ratio}


# -- 3. cold compile ------------------------------------------------------------------------------
async def _phase(base: str, n: int, rate: float, cold_every: int, salt0: int) -> dict:
    import httpx

    ttft_free, ttft_cold = [], []

    async def one(client, i):
        body = {"model": "smol", "stream": True, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Tell me a fact about the number {i}."}]}
        cold = cold_every and i % cold_every == cold_every - 1
        if cold:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "wide", "schema": wide_schema(20, salt0 + i)}}
            body.pop("ignore_eos")
        t0 = time.perf_counter()
        async with client.stream("POST", f"{base}/chat/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            first = None
            async for line in r.aiter_lines():
                if first is None and line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                    first = time.perf_counter() - t0
        (ttft_cold if cold else ttft_free).append(first if first is not None else time.perf_counter() - t0)

    async with httpx.AsyncClient(timeout=300) as client:
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(one(client, i)))
            await asyncio.sleep(1.0 / rate)
        await asyncio.gather(*tasks)
    return {"ttft_free": ttft_free, "ttft_cold": ttft_cold}


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def compile_stall(n: int, rate: float, rounds: int, backend: str) -> dict:
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from server_utils import ServerProcess

    log = RESULTS / "structured_outputs_server.log"
    srv = ServerProcess(["--served-model-name", "smol", "--max-model-len", "2048", "--kv-cache-memory", "1GiB",
                         "--structured-outputs-backend", backend], log)
    try:
        asyncio.run(_phase(srv.base, 4, rate, 0, 0))  # warm up
        phases = {"without": [], "with_cold_compiles": []}
        for r in range(rounds):
            phases["without"].append(asyncio.run(_phase(srv.base, n, rate, 0, 0)))
            phases["with_cold_compiles"].append(asyncio.run(_phase(srv.base, n, rate, 8, 1000 * (r + 1))))
            for k, v in phases.items():
                t = v[-1]["ttft_free"]
                print(f"  round {r + 1} {k:>18}: unconstrained TTFT p50 {pct(t, .5) * 1e3:.0f} ms  p99 {pct(t, .99) * 1e3:.0f} ms"
                      + (f"  (cold-compile requests' TTFT p50 {pct(v[-1]['ttft_cold'], .5) * 1e3:.0f} ms)" if v[-1]["ttft_cold"] else ""))
    finally:
        srv.stop()
    return {"requests_per_phase": n, "rate_per_s": rate, "phases": phases}


def compile_time(llm, backend: str, k: int = 5) -> dict:
    from pagedserve.engine.structured_output import StructuredOutputManager, StructuredOutputsParams as SO

    eng = llm.engine
    m = StructuredOutputManager(eng.tokenizer, eng.arch.vocab_size, eng.eos_token_ids, backend)
    m.grammar(SO(json={"type": "object"})).result()  # backend init (tokenizer tables) outside the timing
    times = []
    for i in range(k):
        t0 = time.perf_counter()
        m.grammar(SO(json=wide_schema(20, 10_000 + i))).result()
        times.append(time.perf_counter() - t0)
    m.shutdown()
    return {"backend": backend, "cold_compile_ms": [t * 1e3 for t in times]}


# -- report ---------------------------------------------------------------------------------------
def report(res: dict) -> None:
    print(f"\nmachine: {res.get('machine')}  backend: {res.get('backend')}")
    if "correctness" in res:
        print("\ncorrectness (jsonschema-valid outputs of the default model):")
        for t, v in res["correctness"].items():
            print(f"  {t:>4}: {v['valid']}/{v['schemas']} = {v['valid_pct']:.1f}%  (hit max_tokens: {v['hit_max_tokens']})")
    if "cost" in res:
        c = res["cost"]
        print(f"\ncost ({c['requests']} concurrent requests, one JSON schema), output tok/s per round:")
        for k, rounds in c["rounds"].items():
            print(f"  {k:>14}: " + "  ".join(f"{x['tok_s']:.1f}" for x in rounds))
        print("  ratio constrained/unconstrained: " + "  ".join(f"{x:.3f}" for x in c["ratio"]))
    if "compile_time" in res:
        for ct in res["compile_time"]:
            ms = ct["cold_compile_ms"]
            print(f"\ncold compile of a 20-field schema ({ct['backend']}): " + ", ".join(f"{x:.1f}" for x in ms) + " ms")
    if "compile" in res:
        ph = res["compile"]["phases"]
        print("\nunconstrained TTFT p99 (ms), without / with cold compiles, per round:")
        for a, b in zip(ph["without"], ph["with_cold_compiles"]):
            pa, pb = pct(a["ttft_free"], .99), pct(b["ttft_free"], .99)
            print(f"  {pa * 1e3:7.0f} / {pb * 1e3:7.0f}   ({(pb / pa - 1) * 100:+.1f}%)")


def plot(res: dict):
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    if "correctness" in res:
        ks = list(res["correctness"])
        axes[0].bar(ks, [res["correctness"][k]["valid_pct"] for k in ks], color="#4c72b0")
        axes[0].set_ylim(0, 105)
        axes[0].set_title(f"valid outputs, {res['correctness'][ks[0]]['schemas']} schemas (%)")
        axes[0].set_xticks(range(len(ks)), [k.removeprefix("t") for k in ks])
        axes[0].set_xlabel("temperature")
    if "cost" in res:
        c = res["cost"]["rounds"]
        for i, (k, col) in enumerate((("unconstrained", "#999999"), ("json_schema", "#4c72b0"))):
            xs = [r + i * 0.38 for r in range(len(c[k]))]
            axes[1].bar(xs, [x["tok_s"] for x in c[k]], width=0.36, color=col, label=k)
        axes[1].set_title(f"{res['cost']['requests']} concurrent requests: output tok/s")
        axes[1].set_xticks([r + 0.19 for r in range(len(c["unconstrained"]))], [str(r + 1) for r in range(len(c["unconstrained"]))])
        axes[1].set_xlabel("round")
        axes[1].legend(loc="lower right")
    if "compile" in res:
        ph = res["compile"]["phases"]
        rows = [("without", ph["without"]), ("with cold compiles", ph["with_cold_compiles"])]
        for i, (k, v) in enumerate(rows):
            axes[2].bar([r + i * 0.38 for r in range(len(v))], [pct(x["ttft_free"], .99) * 1e3 for x in v], width=0.36,
                        label=k, color=["#999999", "#dd8452"][i])
        axes[2].set_title("unconstrained requests: TTFT p99 (ms)")
        axes[2].set_xticks([r + 0.19 for r in range(len(rows[0][1]))], [str(r + 1) for r in range(len(rows[0][1]))])
        axes[2].set_xlabel("round")
        axes[2].legend(loc="lower right")
    fig.suptitle(f"pagedserve structured outputs ({res.get('backend')}) — {res.get('machine')}")
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", choices=["all", "correctness", "cost", "compile"])
    ap.add_argument("--backend", default="auto", help="structured outputs backend (auto, xgrammar, guidance)")
    ap.add_argument("--schemas", type=int, default=200)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--stream-requests", type=int, default=96, help="requests per TTFT phase")
    ap.add_argument("--rate", type=float, default=4.0, help="arrivals per second in the TTFT phases")
    ap.add_argument("--from-json", action="store_true")
    args = ap.parse_args()
    if args.from_json:
        return finish(json.loads(OUT.read_text()), OUT, report, plot, save=False)
    res = json.loads(OUT.read_text()) if OUT.exists() and args.part != "all" else {}
    res.update(machine=machine(), backend=args.backend, date=time.strftime("%Y-%m-%d"))
    if args.part in ("all", "correctness", "cost"):
        from pagedserve import LLM

        llm = LLM(None, max_model_len=4096, kv_cache_memory=1 << 30, structured_outputs_backend=args.backend)
        if args.part in ("all", "correctness"):
            print(f"1. correctness: {args.schemas} schemas x temperature 0 and 1")
            res["correctness"] = correctness(llm, args.schemas)
        if args.part in ("all", "cost"):
            print(f"2. cost: {args.requests} requests x {args.rounds} rounds")
            res["cost"] = cost(llm, args.requests, args.rounds)
            res["compile_time"] = [compile_time(llm, b) for b in ("xgrammar", "guidance")]
        del llm
    if args.part in ("all", "compile"):
        print(f"3. cold compiles vs unconstrained TTFT: {args.stream_requests} requests per phase at {args.rate}/s")
        res["compile"] = compile_stall(args.stream_requests, args.rate, args.rounds, args.backend)
    finish(res, OUT, report, plot)


if __name__ == "__main__":
    main()
