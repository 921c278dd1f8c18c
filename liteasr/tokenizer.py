"""Whisper's tokenizer: byte-level BPE text tokens plus the special and timestamp tokens.

Text goes through the `tokenizers` library (tokenizer.json of the checkpoint). Special token ids
are looked up by their strings rather than hard-coded, because English-only, multilingual and
large-v3 vocabularies place them differently. Timestamp tokens <|0.00|> … <|30.00|> follow
<|notimestamps|> in the id space even when an older tokenizer.json stops before them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "normalizer.json", "added_tokens.json",
                   "special_tokens_map.json", "tokenizer_config.json", "vocabulary.txt", "preprocessor_config.json")
TIME_PRECISION = 0.02  # seconds per timestamp token step


@dataclass
class Tokenizer:
    """Token ids and text conversion for one Whisper vocabulary."""

    hf: object  # tokenizers.Tokenizer
    special: dict[str, int]  # token string -> id for every <|...|> token in the vocabulary
    suppress_tokens: tuple[int, ...] = ()  # never sampled (non-speech symbols and task tokens)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, suppress_tokens: list[int] | None = None) -> "Tokenizer":
        """Load tokenizer.json from a checkpoint directory. `suppress_tokens` None -> derived from the vocabulary."""
        from tokenizers import Tokenizer as HFTokenizer

        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json in the checkpoint directory")
        hf = HFTokenizer.from_file(str(file))
        # the added tokens straight from the parsed tokenizer (re-reading the JSON cost 0.3 s per load)
        special = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.content.startswith("<|")}
        if "<|endoftext|>" not in special:  # GPT-2 style files keep it in the base vocabulary
            special["<|endoftext|>"] = hf.token_to_id("<|endoftext|>")
        tok = cls(hf, special)
        tok.suppress_tokens = tuple(sorted(suppress_tokens if suppress_tokens is not None
                                           else tok.non_speech_tokens() + tok.task_tokens()))
        return tok

    # special ids ---------------------------------------------------------------------------------
    @property
    def eot(self) -> int:
        return self.special["<|endoftext|>"]

    @property
    def sot(self) -> int:
        return self.special["<|startoftranscript|>"]

    @property
    def sot_prev(self) -> int:
        return self.special["<|startofprev|>"]

    @property
    def no_timestamps(self) -> int:
        return self.special["<|notimestamps|>"]

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1

    @property
    def no_speech(self) -> int | None:
        return self.special.get("<|nospeech|>", self.special.get("<|nocaptions|>"))

    @property
    def languages(self) -> dict[str, int]:
        """Language code -> token id, in vocabulary order (the tokens between sot and <|translate|>)."""
        lo, hi = self.sot, self.special["<|translate|>"]
        return {s[2:-2]: i for s, i in sorted(self.special.items(), key=lambda kv: kv[1]) if lo < i < hi}

    def task_tokens(self) -> list[int]:
        """Control tokens that must never be sampled as output (also <|nospeech|>: it is only read as a probability)."""
        names = ("<|translate|>", "<|transcribe|>", "<|startoftranscript|>", "<|startofprev|>", "<|startoflm|>",
                 "<|nospeech|>", "<|nocaptions|>")
        return [self.special[n] for n in names if n in self.special]

    def sot_sequence(self, language: str | None, task: str, multilingual: bool, timestamps: bool) -> list[int]:
        """The decoder prompt: <|sot|> [<|lang|> <|task|>] [<|notimestamps|>] (English-only models skip lang/task)."""
        seq = [self.sot]
        if multilingual:
            if language not in self.languages:
                raise ValueError(f"language {language!r} is not in this model's vocabulary")
            if task not in ("transcribe", "translate"):
                raise ValueError(f"task must be 'transcribe' or 'translate', not {task!r}")
            seq += [self.languages[language], self.special[f"<|{task}|>"]]
        return seq if timestamps else seq + [self.no_timestamps]

    # text ----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, tokens: list[int]) -> str:
        """Text of the text tokens (ids below <|endoftext|>); special and timestamp tokens are dropped."""
        return self.hf.decode([t for t in tokens if t < self.eot], skip_special_tokens=True)

    def non_speech_tokens(self) -> list[int]:
        """Tokens of symbols that are never speech (brackets, music notes, speaker dashes …), which
        Whisper suppresses so that it does not emit subtitle furniture. Single tokens only, so that
        common text tokens that merely start with such a symbol stay allowed."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        notes = set("♩♪♫♬♭♮♯")  # a note is suppressed by its first byte token even when it splits
        ids = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + sorted(notes):
            for toks in (self.encode(symbol), self.encode(" " + symbol)):
                if len(toks) == 1 or symbol in notes:
                    ids.add(toks[0])
        return sorted(ids)
