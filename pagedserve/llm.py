"""Offline API with vLLM's names: LLM(model=...).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import fields, replace

from tqdm import tqdm

from pagedserve.config import EngineConfig
from pagedserve.engine.engine import LLMEngine
from pagedserve.engine.outputs import RequestOutput
from pagedserve.engine.sampling_params import OutputKind, SamplingParams
from pagedserve.model.tokenizer import apply_chat_template

Prompt = str | list[int] | dict


class LLM:
    def __init__(self, model: str | None = None, **kwargs):
        names = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown LLM arguments {unknown}; accepted: {sorted(names - {'model'})}")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        # Offline work starts right away: let the KV cache finish faulting in first, as vLLM
        # allocates its cache at construction (the server instead serves while it happens).
        self.engine.runner.wait_kv_populated()
        self._counter = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts to completion with continuous batching; outputs in input order.

        A prompt is a string, a list of token ids, or {"prompt_token_ids": [...]}.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        # Build (and validate) every request first: their grammars, if any, compile meanwhile on
        # the compile thread; a bad one raises here, before anything is queued.
        parents = []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            if isinstance(prompt, dict):
                prompt = prompt["prompt_token_ids"]
            rid = f"offline-{self._counter}"
            self._counter += 1
            parents.append(self.engine.make_request(
                rid, prompt, replace(sp, output_kind=OutputKind.FINAL_ONLY), priority=priority[i] if priority else 0))
        for i, parent in enumerate(parents):
            try:
                self.engine.wait_for_grammar(parent)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        for parent in parents:
            self.engine.enqueue(parent)
        return self._run([p.request_id for p in parents], use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm or len(ids) < 2)
        out_tokens = 0
        while len(results) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    out_tokens += sum(len(c.token_ids) for c in out.outputs)
                    bar.update(1)
                    rate = out_tokens / max(bar.format_dict["elapsed"], 1e-9)
                    bar.set_postfix_str(f"{rate:.0f} out tok/s")
        bar.close()
        return [results[i] for i in ids]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [apply_chat_template(self.engine.tokenizer, c, add_generation_prompt) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
