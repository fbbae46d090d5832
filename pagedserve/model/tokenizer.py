"""The model's tokenizer: the Rust `tokenizers` library on the serving path, transformers only for
what it is needed for (chat templates, folders without a tokenizer.json), imported on first use.

Importing transformers costs ~1.2 s (it scans its model registry at import), a quarter of a
server's start-up here; encoding and decoding never needed it: PreTrainedTokenizerFast runs the
same tokenizer.json through the same Rust library (tests/test_loader.py checks ids and text
against it).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace


class Tokenizer:
    """encode / decode / eos_token_id from tokenizer.json and tokenizer_config.json; anything else
    (apply_chat_template, convert_ids_to_tokens, ...) from the transformers tokenizer of the same
    folder, loaded once on first use (`preload()` starts that early, on a background thread)."""

    def __init__(self, folder: Path, chat_template: str | None = None):
        from tokenizers import Tokenizer as RustTokenizer

        self.folder = Path(folder)
        try:
            self._tokenizer = RustTokenizer.from_file(str(self.folder / "tokenizer.json"))
        except Exception as e:
            raise ValueError(f"could not load {self.folder / 'tokenizer.json'}: {e}") from e
        cfg_file = self.folder / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        self.eos_token = _content(cfg.get("eos_token"))
        self.bos_token = _content(cfg.get("bos_token"))
        self.eos_token_id = self._tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_token_id = self._tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self._clean_up_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
        self._template_override = _read_template(chat_template)
        self._hf = None
        self._hf_lock = threading.Lock()

    # -- the serving path: Rust only ---------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        return SimpleNamespace(input_ids=self.encode(text, add_special_tokens))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if self._clean_up_spaces:  # transformers' post-decode space clean-up: its own code does it
            return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- everything else: transformers, loaded once ------------------------------------------
    @property
    def hf(self):
        """The transformers tokenizer of this folder (PreTrainedTokenizerFast)."""
        with self._hf_lock:
            if self._hf is None:
                tok = _load_hf(self.folder)
                if self._template_override:
                    tok.chat_template = self._template_override
                self._hf = tok
        return self._hf

    def preload(self) -> threading.Thread:
        """Load the transformers side on a background thread (a server does this once ready, so
        its first chat request does not pay for the import)."""
        t = threading.Thread(target=lambda: self.hf, name="tokenizer-preload", daemon=True)
        t.start()
        return t

    @property
    def chat_template(self) -> str | None:
        if self._template_override:
            return self._template_override
        return self.hf.chat_template

    @chat_template.setter
    def chat_template(self, value: str | None) -> None:
        self._template_override = value
        if self._hf is not None:
            self._hf.chat_template = value

    def apply_chat_template(self, messages, **kwargs):
        return self.hf.apply_chat_template(messages, **kwargs)

    def __getattr__(self, name: str):  # only called for names not found above
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.hf, name)


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _read_template(chat_template: str | None) -> str | None:
    if not chat_template:
        return None
    p = Path(chat_template)
    return p.read_text() if len(chat_template) < 4096 and p.is_file() else chat_template


def _load_hf(folder: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if (folder / "tokenizer.json").exists():
            # Same files, same behaviour, without AutoTokenizer's lazy auto-class imports.
            tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
        else:
            tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise ValueError(f"could not load a tokenizer from {folder} (if it lives elsewhere, name that folder with "
                         f"--tokenizer): {str(e)[:500]}") from e
    if not getattr(tok, "is_fast", False) or not hasattr(tok, "_tokenizer"):
        raise ValueError(f"{folder} has no fast tokenizer (tokenizer.json); pagedserve needs one")
    return tok


def load_tokenizer(folder: Path, chat_template: str | None = None):
    """The folder's tokenizer. `chat_template` (a file path or a Jinja string) overrides the
    tokenizer's own template, as vLLM's --chat-template does. With a tokenizer.json: our
    Tokenizer (no transformers import until needed); otherwise transformers' AutoTokenizer."""
    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        return Tokenizer(folder, chat_template)
    tok = _load_hf(folder)
    if chat_template:
        tok.chat_template = _read_template(chat_template)
    return tok


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this model's tokenizer has no chat template: pass one with --chat-template "
            "(a file or a Jinja string), or use the completions API"
        )
    kw = {"tools": tools} if tools else {}
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt, **kw)
    if hasattr(ids, "keys"):  # transformers >= 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)
