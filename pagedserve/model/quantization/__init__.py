"""Quantized weights: one in-memory form (weight.py) and a reader per checkpoint format (gguf.py,
awq.py, gptq.py, compressed_tensors.py, fp8.py), dispatched by checkpoints.py; rtn.py and awq_search.py
produce checkpoints (`pagedserve quantize`)."""
