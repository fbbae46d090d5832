"""Incremental detokenization with stop strings.

tokenizers' DecodeStream turns one token at a time into text and holds back bytes until they
form whole UTF-8 characters, so a streamed delta never carries a broken character.
Stop strings: the text is cut before the stop string (unless include_stop_str_in_output), and
while streaming the last len(longest stop) - 1 characters are held back, since they could be
the start of a stop string (rounded to the token boundary before them: a delta's text is always
the text of whole tokens, which return_token_ids and the gateway's stream continuation rely on).
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from pagedserve.engine.sampling_params import SamplingParams


class IncrementalDetokenizer:
    def __init__(self, tokenizer, params: SamplingParams):
        self._tok = tokenizer._tokenizer if hasattr(tokenizer, "_tokenizer") else tokenizer
        self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        self._stops = params.stop_strings
        self._include_stop = params.include_stop_str_in_output
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self.text = ""
        self._emitted = 0  # characters of self.text already returned as deltas
        # Where each token's text ends in self.text, known once its characters are whole (a token
        # holding part of a UTF-8 character waits for the one that completes it): which tokens a
        # delta's text covers completely (`covered`), for return_token_ids.
        self._ends: list[int] = []
        self._whole = 0  # tokens whose end is known
        self.covered = 0  # tokens whose text has been returned in full

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token. Returns the stop string if the text now contains one."""
        piece = self._stream.step(self._tok, token_id)
        self._ends.append(-1)
        if not piece:
            return None
        start = max(0, len(self.text) - self._hold)
        self.text += piece
        for k in range(self._whole, len(self._ends)):
            self._ends[k] = len(self.text)
        self._whole = len(self._ends)
        for stop in self._stops if check_stop else ():
            i = self.text.find(stop, start)
            if i != -1:
                self.text = self.text[: i + len(stop)] if self._include_stop else self.text[:i]
                return stop
        return None

    def delta(self, finished: bool) -> str:
        """New text since the last call, holding back a possible stop-string prefix. It ends on a
        token boundary (a held-back prefix never splits a token's text), so the tokens a delta
        covers (`covered`) are exactly the tokens its text came from."""
        if finished:
            end, self.covered = len(self.text), len(self._ends)
        else:
            limit = len(self.text) - self._hold if self._stops else len(self.text)
            end, k = self._emitted, self.covered
            while k < self._whole and self._ends[k] <= limit:
                end, k = max(end, self._ends[k]), k + 1
            self.covered = k
        out = self.text[self._emitted : end]
        self._emitted = end
        return out
