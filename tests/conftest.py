import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No GPU: the Triton kernels (the GPU path's) run in Triton's interpreter, which has to be chosen
# before anything imports Triton (tests/test_triton_attention.py).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model_dir():
    from pagedserve.model.loader import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    from pagedserve.testing import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {k: make_tiny_model(root / k, k) for k in ("llama", "llama3", "qwen2", "mistral")}


@pytest.fixture(scope="session")
def llm(default_model_dir):
    """The default model in float32, shared by the engine tests (each test leaves it idle and
    leak-free). float32 is the exact path (token for token with transformers); where the CPU has
    AVX512_BF16, `auto` computes in bf16, which tests/test_bf16.py covers."""
    from pagedserve import LLM

    return LLM(str(default_model_dir), max_model_len=2048, kv_cache_memory=256 << 20, dtype="float32")


@pytest.fixture(scope="session")
def hf_model(default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()


def assert_no_leaks(engine):
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks, "KV blocks leaked"
    assert not engine.kv.req_blocks


@pytest.fixture(scope="session")
def server(tmp_path_factory, default_model_dir):
    """The default model behind a real server process."""
    from server_utils import ServerProcess

    s = ServerProcess([str(default_model_dir), "--served-model-name", "smol", "--kv-cache-memory", "256MiB",
                       "--max-model-len", "2048", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
                      tmp_path_factory.mktemp("srv") / "server.log")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory, tiny_dirs):
    """A tiny random model behind a real server, for tests where the model does not matter."""
    from server_utils import ServerProcess

    s = ServerProcess([str(tiny_dirs["llama"]), "--served-model-name", "tiny", "--kv-cache-memory", "32MiB",
                       "--max-model-len", "512", "--max-request-body-bytes", "65536"],
                      tmp_path_factory.mktemp("tiny-srv") / "server.log")
    yield s
    assert s.stop() == 0
