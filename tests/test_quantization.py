"""--quantization and quantized checkpoints (issue 25): the method is read from the checkpoint
(config.json quantization_config, or a GGUF), a flag that disagrees is an error, and an unknown
method — or a config naming a method whose tensors are missing — is refused at startup by name:
never a crash mid-load or weights silently misread. (Loading each format: test_quant_checkpoints.py.)"""

from __future__ import annotations

import json
import shutil

import pytest

from pagedserve import LLM
from pagedserve.cli import build_parser
from pagedserve.config import EngineConfig


def _quantized_copy(src, dst, quant_config):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = quant_config
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("method,match", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, r"tensors \(\*\.qweight\) are not in the checkpoint"),
    ({"quant_method": "compressed_tensors"}, r"tensors \(\*\.weight_scale\) are not in the checkpoint"),
    ({"quant_method": "GPTQ", "bits": 4}, r"tensors \(\*\.qweight\) are not in the checkpoint"),
    ({"quant_method": "hqq"}, "quantized with 'hqq' .* does not know"),
    ({"bits": 4}, "quantized with 'unnamed'"),
])
def test_unknown_or_broken_quantized_checkpoints_are_refused_by_name_at_startup(tiny_dirs, tmp_path, method, match):
    folder = _quantized_copy(tiny_dirs["llama"], tmp_path / "q", method)
    with pytest.raises(ValueError, match=match):
        LLM(str(folder), kv_cache_memory=16 << 20)


def test_a_flag_that_disagrees_with_the_checkpoint_is_an_error(tiny_dirs, default_model_dir):
    with pytest.raises(ValueError, match="--quantization awq was given, but the checkpoint is not quantized"):
        LLM(str(tiny_dirs["llama"]), quantization="awq", kv_cache_memory=16 << 20)
    with pytest.raises(ValueError, match="--quantization gptq was given, but the checkpoint is quantized with 'gguf'"):
        LLM(None, quantization="gptq", kv_cache_memory=16 << 20)
    llm = LLM(None, quantization="gguf", max_model_len=256, kv_cache_memory=16 << 20)
    assert llm.engine.quantization == "gguf"
    # The GGUF's converted folder holds its weights dequantized: a float checkpoint.
    assert LLM(str(default_model_dir), max_model_len=256, kv_cache_memory=16 << 20).engine.quantization is None
    assert LLM(str(tiny_dirs["llama"]), kv_cache_memory=16 << 20).engine.quantization is None


def test_unknown_names_fail_before_anything_loads():
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="int4")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantization", "bitsandbytes"])
    assert build_parser().parse_args(["serve", "-q", "compressed-tensors"]).quantization == "compressed-tensors"
