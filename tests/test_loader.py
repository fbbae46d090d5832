"""Model loading: GGUF conversion, HF folders, hub ids through the HF cache, and clear errors."""

import json
import shutil

import pytest
import torch

from pagedserve.model.loader import default_model_gguf, read_gguf_weights, resolve_model


def test_gguf_dequantization_matches_transformers(default_model_dir):
    """Our GGUF reader (incl. undoing llama.cpp's Q/K row permutation) gives the same tensors
    as transformers' own GGUF loader (load_gguf_checkpoint, what from_pretrained(gguf_file=)
    calls; given the model's shape directly, it parses the 49k-token GGUF header once, not twice)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = default_model_gguf()
    ours = read_gguf_weights(gguf, 9, 3, "llama")
    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(default_model_dir)))
    ref = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=shape)["tensors"]
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                 "model.layers.7.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"]:
        assert torch.equal(ours[name], ref[name]), name
    assert "lm_head.weight" not in ours  # tied embeddings


def test_default_model_cached_folder(default_model_dir):
    assert (default_model_dir / "model.safetensors").exists()
    assert (default_model_dir / "tokenizer.json").exists()
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["tie_word_embeddings"] is True
    assert resolve_model(None) == default_model_dir
    assert resolve_model(str(default_model_gguf())) == default_model_dir


def test_hub_id_resolves_from_hf_cache(tiny_dirs, tmp_path, monkeypatch):
    """A hub id found in the Hugging Face cache loads offline."""
    from pagedserve import LLM, SamplingParams

    cache = tmp_path / "hub"
    snap = cache / "models--tiny-org--tiny-llama" / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_dirs["llama"], snap)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("tiny-org/tiny-llama") == snap
    llm = LLM("tiny-org/tiny-llama", kv_cache_memory=8 << 20, max_model_len=256)
    assert len(llm.generate("hello", SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids) == 4


def test_unknown_hub_id_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="nobody/no-such-model"):
        resolve_model("nobody/no-such-model")


def test_missing_path_and_files(tmp_path, tiny_dirs):
    from pagedserve import LLM

    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(empty))
    no_weights = tmp_path / "noweights"
    shutil.copytree(tiny_dirs["llama"], no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(no_weights), kv_cache_memory=8 << 20)


def test_unsupported_architecture(tmp_path, tiny_dirs):
    from pagedserve import LLM

    bad = tmp_path / "gpt2"
    shutil.copytree(tiny_dirs["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LLM(str(bad), kv_cache_memory=8 << 20)


def test_missing_weight_is_named(tmp_path, tiny_dirs):
    from safetensors.torch import load_file, save_file

    from pagedserve import LLM

    bad = tmp_path / "partial"
    shutil.copytree(tiny_dirs["llama"], bad)
    w = load_file(str(bad / "model.safetensors"))
    del w["model.layers.1.mlp.down_proj.weight"]
    save_file(w, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="down_proj"):
        LLM(str(bad), kv_cache_memory=8 << 20)


def test_tokenizer_matches_transformers_without_importing_it(default_model_dir, tmp_path):
    """Our Tokenizer (Rust `tokenizers` on the serving path) gives transformers' ids and text for
    every parity prompt, with and without special tokens, and the same chat-template ids; loading
    it does not import transformers (a second of every start)."""
    import subprocess
    import sys

    from prompts import SHORT, long_prompt
    from pagedserve.model.tokenizer import Tokenizer, _load_hf, apply_chat_template, load_tokenizer

    code = ("import sys; from pagedserve.model.tokenizer import load_tokenizer; "
            f"t = load_tokenizer({str(default_model_dir)!r}); t.decode(t.encode('hi')); "
            "print('transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"

    ours, ref = load_tokenizer(default_model_dir), _load_hf(default_model_dir)
    assert isinstance(ours, Tokenizer)
    texts = SHORT + [long_prompt(600, ref), "<|im_start|>user\nhi<|im_end|>", "héllo wörld 🤖 ,. n't", "", "  x"]
    for text in texts:
        for special in (True, False):
            ids = ours(text, add_special_tokens=special).input_ids
            assert ids == ref(text, add_special_tokens=special).input_ids, text
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert (ours.eos_token_id, ours.bos_token_id) == (ref.eos_token_id, ref.bos_token_id)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    assert apply_chat_template(ours, chat) == apply_chat_template(ref, chat)
    assert ours.convert_ids_to_tokens([1, 2]) == ref.convert_ids_to_tokens([1, 2])  # delegated
    custom = load_tokenizer(default_model_dir, chat_template="{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert custom.decode(apply_chat_template(custom, chat, add_generation_prompt=False)) == "[Be brief.][Name a colour.]"
    # A config asking for transformers' space clean-up after decoding: still transformers' text.
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / f, tmp_path / f)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg | {"clean_up_tokenization_spaces": True}))
    tidy, tidy_ref = load_tokenizer(tmp_path), _load_hf(tmp_path)
    ids = tidy.encode("Well , is n't it ? Yes !")
    assert tidy.decode(ids) == tidy_ref.decode(ids)


def test_load_format_dummy_makes_random_weights_of_the_configs_shapes(tiny_dirs):
    """--load-format dummy (vLLM's): no checkpoint read, every weight drawn where it lives (norms 1),
    the same draw for the same --seed; refused where the weights would have been quantized."""
    from pagedserve import LLM, SamplingParams
    from pagedserve.cli import build_parser
    from pagedserve.model.llama import RMSNorm

    real = LLM(str(tiny_dirs["llama3"]), dtype="float32", kv_cache_memory=4 << 20, max_model_len=128)
    dummies = [LLM(str(tiny_dirs["llama3"]), dtype="float32", kv_cache_memory=4 << 20, max_model_len=128,
                   load_format="dummy", seed=s) for s in (0, 0, 1)]
    params = [dict(m.engine.runner.model.named_parameters()) for m in [real, *dummies]]
    norms = {n for n, mod in real.engine.runner.model.named_modules() if isinstance(mod, RMSNorm)}
    assert set(params[0]) == set(params[1])
    for name, w in params[1].items():
        if name.rsplit(".", 1)[0] in norms:
            assert torch.equal(w, torch.ones_like(w)), name
        else:
            assert not torch.equal(w, params[0][name]) and 0.015 < w.std().item() < 0.025, name
            assert torch.equal(w, params[2][name]) and not torch.equal(w, params[3][name]), name
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    outs = [m.generate([[5, 6, 7]], sp, use_tqdm=False)[0].outputs[0].token_ids for m in dummies]
    assert outs[0] == outs[1] and len(outs[0]) == 5
    assert "random" in dummies[0].engine.runner.weights_description()
    with pytest.raises(ValueError, match="dummy"):
        LLM(None, load_format="dummy")  # the default model is a GGUF
    with pytest.raises(ValueError, match="load_format"):
        LLM(str(tiny_dirs["llama3"]), load_format="npcache")
    assert build_parser().parse_args(["serve", "--load-format", "dummy"]).load_format == "dummy"


def _same_tensors(mine, ref):
    import numpy as np

    assert [t.name for t in mine] == [t.name for t in ref]
    for a, b in zip(mine, ref):
        assert a.tensor_type == b.tensor_type and a.shape.tolist() == b.shape.tolist(), a.name
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name


def test_gguf_tensors_are_gguf_pys_without_reading_the_metadata(tmp_path):
    """model/gguf_file.py against gguf-py's GGUFReader: the default model (its 49k-token vocabulary
    in the metadata), and a file with every metadata value type, a custom alignment and tensors
    of plain and block types. Bad files get errors that say what is wrong."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import quantize

    from pagedserve.model.gguf_file import read_gguf_tensors

    _same_tensors(read_gguf_tensors(default_model_gguf()), GGUFReader(default_model_gguf()).tensors)
    path = tmp_path / "all.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    w.add_string("s", "text é")
    w.add_array("strings", ["a", "bé", ""])
    w.add_array("ints", [1, 2, 3])
    w.add_array("floats", [0.5, 1.5])
    w.add_array("nested", [[1, 2], [3]])
    w.add_bool("b", True)
    for name, vtype in (("u8", GGUFValueType.UINT8), ("i16", GGUFValueType.INT16), ("u64", GGUFValueType.UINT64),
                        ("f64", GGUFValueType.FLOAT64)):
        w.add_key_value(name, 7, vtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 64)).astype(np.float32)
    w.add_tensor("f32", x)
    w.add_tensor("f16", x.astype(np.float16))
    for kind in ("Q8_0", "Q4_0", "Q4_1"):
        t = GGMLQuantizationType[kind]
        w.add_tensor(kind.lower(), quantize(rng.standard_normal((4, 256)).astype(np.float32), t), raw_dtype=t)
    for kind in ("Q5_K", "Q6_K"):  # no quantizer in gguf-py: raw blocks of the right size
        t = GGMLQuantizationType[kind]
        block, size = GGML_QUANT_SIZES[t]
        raw = rng.integers(0, 255, (4, 512 // block * size), dtype=np.uint8)
        w.add_tensor(kind.lower(), raw, raw_shape=raw.shape, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    mine = read_gguf_tensors(path)
    assert len(mine) == 7 and mine[0].data.ctypes.data % 64 == 0
    _same_tensors(mine, GGUFReader(path).tensors)
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF"):
        read_gguf_tensors(tmp_path / "bad.gguf")
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="past the end"):
        read_gguf_tensors(tmp_path / "cut.gguf")


def test_tokenizer_flag_reads_the_tokenizer_from_elsewhere(tiny_dirs, tmp_path):
    """vLLM's --tokenizer: weights in one folder, the tokenizer in another (here the same model's,
    so the outputs must be the ones with the tokenizer beside the weights)."""
    from pagedserve import LLM, SamplingParams

    bare = tmp_path / "weights-only"
    shutil.copytree(tiny_dirs["llama"], bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.suffix in (".model", ".jinja", ".txt"):
            f.unlink()
    kw = dict(kv_cache_memory=8 << 20, max_model_len=128, dtype="float32")
    with pytest.raises(ValueError, match="--tokenizer"):  # no tokenizer beside the weights, none named
        LLM(str(bare), **kw)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = LLM(str(tiny_dirs["llama"]), **kw).generate("a tokenizer", sp, use_tqdm=False)[0].outputs[0]
    got = LLM(str(bare), tokenizer=str(tiny_dirs["llama"]), **kw).generate("a tokenizer", sp, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == want.token_ids and got.text == want.text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        LLM(str(bare), tokenizer=str(empty), **kw)


@pytest.mark.parametrize("flags, message", [
    (["--no-enable-chunked-prefill"], "always chunks long prompts"),
    (["--pipeline-parallel-size", "2"], "pipeline parallelism is not implemented"),
])
def test_vllm_flags_it_cannot_honour_are_refused_by_name(tiny_dirs, flags, message):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pagedserve.cli", "serve", str(tiny_dirs["llama"]), *flags],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_vllm_flags_accepted_as_they_are():
    from pagedserve.cli import build_parser

    args = build_parser().parse_args(["serve", "--enable-chunked-prefill", "--swap-space", "4", "-pp", "1",
                                      "--tokenizer", "some/tokenizer"])
    assert args.enable_chunked_prefill is True and args.swap_space == 4 and args.pipeline_parallel_size == 1
    assert args.tokenizer == "some/tokenizer"
