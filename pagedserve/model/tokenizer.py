"""Tokenizer and chat template, through transformers (fast tokenizers only)."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(folder: Path, chat_template: str | None = None):
    """Load the folder's tokenizer. `chat_template` (a file path or a Jinja string) overrides
    the tokenizer's own template, as vLLM's --chat-template does."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if (Path(folder) / "tokenizer.json").exists():
            # Same files, same behaviour (post-processor, special tokens, chat template), without
            # AutoTokenizer's lazy auto-class imports (~1.7 s of every server start).
            tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
        else:
            tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise ValueError(f"could not load a tokenizer from {folder}: {e}") from e
    if not getattr(tok, "is_fast", False) or not hasattr(tok, "_tokenizer"):
        raise ValueError(f"{folder} has no fast tokenizer (tokenizer.json); pagedserve needs one")
    if chat_template:
        p = Path(chat_template)
        tok.chat_template = p.read_text() if p.is_file() else chat_template
    return tok


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this model's tokenizer has no chat template: pass one with --chat-template "
            "(a file or a Jinja string), or use the completions API"
        )
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(ids, "keys"):  # transformers >= 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)
