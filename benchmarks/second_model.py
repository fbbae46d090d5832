"""A second Llama-family model with float weights, trained here (issue 25's accuracy table).

Why: issue 25 measures quantization on the default model *and a second Llama-family model*, and
int4/AWQ's target is about float originals. The default model exists here only as its Q4_1 GGUF
(its "float" weights already sit on a 4-bit grid), and no float checkpoint can be downloaded on
these machines (only package registries are reachable; no PyPI/npm/Debian package ships one). So
this script makes one: a small Llama (Llama 3's layout: GQA, SwiGLU, RoPE, RMSNorm, tied
embeddings; a byte-level BPE tokenizer of 8192 tokens trained on the same text, since a 49k
vocabulary would spend three quarters of a small model's training FLOPs in its output head) trained from scratch with AdamW on the English prose and
documentation this machine already has (Newton's *Opticks* from a Python package's test data, Vim's
help, Python's own topic docs, the .txt/.rst/.md files of the installed packages), found at run time.
It is a weak language model (minutes of CPU, a few million tokens) but a real float one: weights
shaped by training, not on any grid, so `pagedserve quantize` meets the case its users bring.

  python benchmarks/second_model.py --minutes 25        # train, save to ~/.cache/pagedserve/second-model
  python benchmarks/quant_weights.py --second-model     # its accuracy table (float32, int8, int4-rtn, gptq, awq)

The folder holds config.json, model.safetensors, the tokenizer and train_log.json (corpus files,
token counts, loss curve, seed). bf16 autocast where the CPU has AVX512_BF16 (2-4x faster here),
float32 elsewhere; the saved weights are float32.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from pagedserve.model.loader import cache_root

OUT = cache_root() / "second-model"
EVAL_TEXT = Path(__file__).parent / "data" / "eval_text.txt"
VOCAB = 8192
CONFIG = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
              tie_word_embeddings=True, hidden_act="silu")


def _text_files(roots: list[Path], min_bytes: int, max_bytes: int):
    """Text and documentation files (.txt/.rst/.md) under `roots`, in name order, of min_bytes <
    size <= max_bytes, leaving out licenses, changelogs and the like."""
    for root in roots:
        for p in sorted(root.rglob("*")) if root.exists() else []:
            if p.suffix in (".txt", ".rst", ".md") and p.is_file() and min_bytes < p.stat().st_size <= max_bytes \
                    and not any(w in p.name.upper() for w in ("LICENSE", "COPYING", "CHANGE", "NEWS", "HISTORY",
                                                               "AUTHORS", "RECORD")):
                yield p


def corpus_files() -> list[Path]:
    """English text already on this machine: prose first, then documentation, at most ~40 MB."""
    import sysconfig

    paths = sysconfig.get_paths()
    found = list(_text_files([Path(paths["purelib"]), Path(paths["stdlib"]), Path("/usr/share/vim"),
                              Path("/usr/share/doc")], 20_000, 5_000_000))
    topics = Path(paths["stdlib"]) / "pydoc_data" / "topics.py"
    if topics.exists():
        found.append(topics)
    found.sort(key=lambda p: ("Opticks" not in p.name, str(p)))  # the one book first
    out, total = [], 0
    for p in found:
        if total > 40_000_000:
            break
        out.append(p)
        total += p.stat().st_size
    return out


def heldout_text(chars: int = 5000) -> tuple[str, list[str]]:
    """Text of the corpus's own kind that training never read: files of the same folders too small
    for corpus_files (8-20 KB: Node's shorter API pages, git's shorter release notes, ...), the start
    of one file per folder, in name order, `chars` in all. Against it the model is a competent one
    (the fixed eval text is far from what it read)."""
    import sysconfig

    picked, parts, folders = [], [], set()
    for p in _text_files([Path("/usr/share/doc"), Path(sysconfig.get_paths()["purelib"])], 8_000, 20_000):
        if len(parts) == 4:
            break
        if p.parent not in folders and english_share(text := p.read_text(errors="ignore")) >= 0.8:
            parts.append(text[:chars // 4])
            picked.append(str(p))
            folders.add(p.parent)
    return "\n".join(parts), picked


def train_tokenizer(texts: list[str]):
    """Byte-level BPE (GPT-2's and SmolLM2's kind) of VOCAB tokens on the corpus, as a transformers
    fast tokenizer (tokenizer.json), with <|endoftext|> as bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def english_share(text: str) -> float:
    letters = sum(c.isalpha() or c == " " for c in text)
    return letters / max(len(text), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=25.0, help="training time (the model is saved at the end)")
    ap.add_argument("--seq", type=int, default=1024, help="training sequence length (the eval text is ~1000 tokens)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    import torch
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    from pagedserve.model import cpu_kernels

    torch.manual_seed(args.seed)
    eval_text = EVAL_TEXT.read_text()
    texts, used = [], []
    for p in corpus_files():
        try:
            text = p.read_text(errors="ignore")
        except OSError:
            continue
        if english_share(text) >= 0.8 and eval_text[:200] not in text:  # markup-heavy files out; never the eval text
            texts.append(text)
            used.append(str(p))
    tok = train_tokenizer(texts)
    ids: list[int] = []
    for text in tqdm(texts, desc="tokenizing the corpus", file=sys.stderr):
        ids.extend(tok(text).input_ids + [tok.eos_token_id])
    data = torch.tensor(ids)
    print(f"corpus: {len(used)} files, {len(data) / 1e6:.2f}M tokens", flush=True)

    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **CONFIG)
    model = LlamaForCausalLM(cfg)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
    bf16 = cpu_kernels.bf16_gemm() is not None  # AVX512_BF16 here (emulated bf16 would be far slower)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    t0, step, log = time.monotonic(), 0, []
    bar = tqdm(total=int(budget), desc="training (s)", file=sys.stderr)
    model.train()
    while (elapsed := time.monotonic() - t0) < budget:
        frac = elapsed / budget  # warm-up, then cosine decay over the time budget
        lr = args.lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,))
        x = torch.stack([data[s:s + args.seq] for s in starts])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        log.append((round(elapsed, 1), round(loss.item(), 4)))
        bar.update(int(time.monotonic() - t0) - bar.n)
        bar.set_postfix(step=step, loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
    bar.close()
    model.eval()
    with torch.inference_mode():
        e = tok(eval_text, return_tensors="pt").input_ids
        ppl = math.exp(model(input_ids=e, labels=e).loss.item())
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), safe_serialization=True)
    tok.save_pretrained(str(args.out))
    (args.out / "train_log.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M"), "seed": args.seed, "minutes": args.minutes, "steps": step,
        "tokens_seen": step * args.batch * args.seq, "corpus_tokens": len(data), "corpus_files": used,
        "bf16_autocast": bf16, "eval_text_perplexity": ppl, "config": CONFIG, "loss": log}, indent=1))
    print(f"saved {args.out}: {step} steps, {step * args.batch * args.seq / 1e6:.1f}M tokens seen, "
          f"perplexity on the eval text {ppl:.1f}", flush=True)


if __name__ == "__main__":
    main()
