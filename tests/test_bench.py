"""`pagedserve bench` against a real server: fixed concurrency and Poisson arrivals."""

import json
import subprocess
import sys

from pagedserve.bench.workload import synthetic_workload


def test_workload_is_seeded_and_in_range():
    a, b = synthetic_workload(50, seed=3), synthetic_workload(50, seed=3)
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert all(32 <= len(r.prompt_token_ids) <= 512 and 32 <= r.max_tokens <= 256 for r in a)
    assert synthetic_workload(5, seed=4)[0].prompt_token_ids != a[0].prompt_token_ids


def run_bench(tiny_server, tmp_path, *extra):
    out = tmp_path / "res.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pagedserve.cli", "bench", "--base-url", tiny_server.base, "--num-requests", "12",
         "--prompt-len", "8", "32", "--output-len", "4", "12", "--label", "tiny", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text()), out, proc.stdout


def test_bench_concurrency_levels(tiny_server, tmp_path):
    res, out, stdout = run_bench(tiny_server, tmp_path, "--concurrency", "1", "4")
    assert [lv["concurrency"] for lv in res["levels"]] == [1, 4]
    for i, lv in enumerate(res["levels"]):
        assert lv["seed"] == i  # each level has its own prompts: no prefix-cache carry-over
        expected_tokens = sum(r.max_tokens for r in synthetic_workload(12, (8, 32), (4, 12), seed=i))
        assert lv["ok"] == 12 and lv["errors"] == 0
        assert lv["output_tokens"] == expected_tokens  # ignore_eos: every request runs to max_tokens
        assert 0 < lv["ttft_p50"] <= lv["ttft_p99"] and lv["itl_p50"] > 0 and lv["e2e_p50"] >= lv["ttft_p50"]
        assert lv["output_tok_s"] > 0
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "out tok/s" in stdout


def test_bench_poisson_rate(tiny_server, tmp_path):
    res, _, _ = run_bench(tiny_server, tmp_path, "--request-rate", "20")
    (lv,) = res["levels"]
    assert lv["request_rate"] == 20 and lv["ok"] == 12 and lv["errors"] == 0


def test_bench_reports_errors(tmp_path):
    from server_utils import free_port

    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "pagedserve.cli", "bench", "--base-url",
                           f"http://127.0.0.1:{free_port()}/v1", "--model", "x", "--num-requests", "3",
                           "--concurrency", "2", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lv = json.loads(out.read_text())["levels"][0]
    assert lv["errors"] == 3 and "Connect" in lv["error_samples"][0]


def test_the_gpu_session_script_runs_every_phase_on_a_cpu(tmp_path, default_model_dir):
    """benchmarks/gpu_session.py is run only when a GPU is lent (rarely): its --dry-run runs every
    phase's code here at miniature shapes, so the script is known to work before a GPU minute is
    spent on it. The numbers are this CPU's and mean nothing."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "benchmarks/gpu_session.py"), "--tokenizer", str(default_model_dir),
                        "--dry-run", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_session.json").read_text())["phases"]
    assert set(res) == {"ceilings", "decode", "planner", "offline", "kernels", "correctness"}
    assert res["decode"]["batch1_graphs"]["graph_sizes"] == 4 and res["decode"]["batch1_graphs"]["replayed_steps"] > 0
    assert res["decode"]["batch3_graphs"]["ms_per_step"] > 0 and res["decode"]["batch1_graphs_async"]["ms_per_token"] > 0
    assert res["decode"]["batch1_eager"]["hbm_fraction"] > 0
    assert [row["batch"] for row in res["planner"]["rows"]] == [1, 4]
    assert res["offline"]["ours_out_tok_s"] > 0 and res["offline"]["hf_out_tok_s"] > 0
    assert "CUDA" in res["kernels"]["skipped"] and "CUDA" in res["correctness"]["skipped"]
    assert (tmp_path / "gpu_session.png").stat().st_size > 0
