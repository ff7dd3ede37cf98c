"""Byte-level BPE tokenizer: training, loading, and the chat template.

The tokenizer is the `tokenizers` library's byte-level BPE (the GPT-2 / DeepSeek-V3 family): text is turned
into UTF-8 bytes before merging, so every string round-trips exactly and there is no unknown token.

Special tokens (ids are fixed by their order, so the model config's defaults bos_token_id=0, eos_token_id=1 hold):

    0  <|begin_of_sentence|>   BOS, starts every chat
    1  <|end_of_sentence|>     EOS, separates pretraining documents and ends every assistant turn
    2  <|pad|>                 padding (never trained on)
    3  <|system|>              chat roles: each opens a message of that role
    4  <|user|>
    5  <|assistant|>

Reasoning tags `<think>`, `</think>`, `<answer>`, `</answer>` are single tokens too, added after the learned
merges (the last four ids). They are *not* "special" in the transformers sense, like DeepSeek-R1's `<think>`:
decode(skip_special=True) keeps them, because they are part of the model's visible answer.

Special tokens written in plain text are parsed as those tokens (encode("a<think>b") gives the <think> id).
That is what chat use needs (a rendered template is just a string) and what transformers does by default;
it also means a pretraining document that literally contains "<|end_of_sentence|>" gets an EOS there.

The chat format (one string, no separators beyond the role tokens, following DeepSeek-V3's template):

    <|begin_of_sentence|><|system|>{system}<|user|>{user}<|assistant|>{assistant}<|end_of_sentence|>...

with add_generation_prompt=True appending `<|assistant|>`. The same format is stored as a Jinja
`chat_template` in tokenizer_config.json, so transformers' apply_chat_template renders the identical string.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from nanoseek.corpus import check_inputs, iter_documents
from nanoseek.io_utils import atomic_write, atomic_write_text

BOS = "<|begin_of_sentence|>"
EOS = "<|end_of_sentence|>"
PAD = "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS.values()]
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
BYTE_ALPHABET = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET + len(SPECIAL_TOKENS) + len(REASONING_TOKENS)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# The Jinja twin of render_chat() below; tests check that both render the same string. The {% generation %}
# block marks the SFT targets, so transformers' return_assistant_tokens_mask agrees with encode_chat_with_mask.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' + message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class TokenizerError(ValueError):
    """Bad tokenizer input (files, vocab size, messages); the message says what to change."""


# ---------------------------------------------------------------------------------------------- chat template
def _chat_segments(messages: list[dict], add_generation_prompt: bool, bos: str, eos: str):
    """The rendered chat as (text, is_assistant_target) pieces; render and mask both derive from this."""
    if not isinstance(messages, (list, tuple)):
        raise TokenizerError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    segments = [(bos, False)]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TokenizerError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        role, content = m["role"], m["content"]
        if role not in ROLE_TOKENS:
            raise TokenizerError(f"message {i} has unknown role {role!r}; use one of {sorted(ROLE_TOKENS)}")
        if not isinstance(content, str):
            raise TokenizerError(f"message {i} content must be a string, got {type(content).__name__}")
        segments.append((ROLE_TOKENS[role], False))
        if role == "assistant":
            # the model learns to write the content and to stop (EOS), not to predict the role token
            segments += [(content, True), (eos, True)]
        else:
            segments.append((content, False))
    if add_generation_prompt:
        segments.append((ROLE_TOKENS["assistant"], False))
    return segments


def render_chat(messages: list[dict], add_generation_prompt: bool = False, bos: str = BOS, eos: str = EOS) -> str:
    """Render a conversation to the single string the model sees (same as CHAT_TEMPLATE)."""
    return "".join(text for text, _ in _chat_segments(messages, add_generation_prompt, bos, eos))


# --------------------------------------------------------------------------------------- the loaded tokenizer
@dataclass
class Tokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` with nanoseek's special tokens and chat format."""

    tok: tokenizers.Tokenizer
    bos_token: str = BOS
    eos_token: str = EOS
    pad_token: str = PAD

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, name: str) -> int:
        """Id of a token given by its string (e.g. "<think>"); raises if it is not a single token."""
        i = self.tok.token_to_id(name)
        if i is None:
            raise TokenizerError(f"token {name!r} is not in this tokenizer's vocabulary")
        return i

    @property
    def bos_id(self) -> int:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.token_id(self.pad_token)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` (special-token strings in it become those tokens, see module docstring)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() for many texts at once (parallel in the Rust library)."""
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of `ids`; skip_special drops BOS/EOS/PAD/role tokens but keeps reasoning tags."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return render_chat(messages, add_generation_prompt, self.bos_token, self.eos_token)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    def encode_chat_with_mask(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(ids, mask) for SFT: mask is 1 exactly on assistant content tokens and the EOS that ends each turn.

        Pieces are encoded one by one; because special tokens are split out before byte-level
        pre-tokenization, the concatenation equals encode_chat(messages) (tests check this).
        """
        ids, mask = [], []
        for text, target in _chat_segments(messages, False, self.bos_token, self.eos_token):
            piece = self.encode(text)
            ids += piece
            mask += [int(target)] * len(piece)
        return ids, mask

    def save(self, out_dir: str) -> None:
        """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json, each atomically.

        tokenizer.json goes last, so a directory that has it has the others too.
        """
        os.makedirs(out_dir, exist_ok=True)
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                    "additional_special_tokens": list(ROLE_TOKENS.values())}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,  # decode must give back the exact text
            "model_max_length": 1_000_000_000,
        }
        atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config, indent=2) + "\n")
        atomic_write_text(os.path.join(out_dir, "special_tokens_map.json"), json.dumps(specials, indent=2) + "\n")
        atomic_write_text(os.path.join(out_dir, "tokenizer.json"), self.tok.to_str(pretty=True))


def load_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer directory (or a checkpoint directory holding tokenizer.json)."""
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise FileNotFoundError(f"no tokenizer.json in {path!r}; train one with "
                                f"`nanoseek tokenizer train --input FILE... --vocab-size N --out DIR`")
    tok = tokenizers.Tokenizer.from_file(tok_file)
    names = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
        for key in names:
            value = cfg.get(key)
            if isinstance(value, dict):  # transformers also writes {"content": ..., ...}
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
    return Tokenizer(tok, **names)


def copy_tokenizer(src_dir: str, dst_dir: str) -> None:
    """Copy the tokenizer files from src_dir into dst_dir (e.g. a checkpoint), each file atomically."""
    if not os.path.isfile(os.path.join(src_dir, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {src_dir!r} to copy")
    os.makedirs(dst_dir, exist_ok=True)
    # tokenizer.json last, matching save(): its presence marks a complete copy
    for name in sorted(TOKENIZER_FILES, key=lambda n: n == "tokenizer.json"):
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            atomic_write(os.path.join(dst_dir, name), lambda tmp, src=src: shutil.copyfile(src, tmp))


# --------------------------------------------------------------------------------------------------- training
def train_tokenizer(files: list[str], vocab_size: int, out_dir: str, min_frequency: int = 2,
                    show_progress: bool = False) -> Tokenizer:
    """Train byte-level BPE on text files (one document each) or .jsonl files ("text" per line); save to out_dir.

    vocab_size counts everything: 256 byte symbols, the special and reasoning tokens, and the learned merges.
    On a small corpus BPE may run out of merges first, so the result can be smaller; check .vocab_size.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE} "
            f"({BYTE_ALPHABET} byte symbols + {len(SPECIAL_TOKENS) + len(REASONING_TOKENS)} special tokens); "
            f"use e.g. --vocab-size 4096")
    check_inputs(files)

    n_chars = 0

    def documents():
        nonlocal n_chars
        for path in files:
            for text in iter_documents(path):
                n_chars += len(text)
                yield text

    tok = tokenizers.Tokenizer(models.BPE())
    # no normalizer: bytes in, bytes out, so decode(encode(x)) == x for any string
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(REASONING_TOKENS),  # reasoning tags are appended after training
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        show_progress=show_progress,
    )
    tok.train_from_iterator(documents(), trainer=trainer)
    if n_chars == 0:
        raise TokenizerError(f"all {len(files)} input file(s) are empty; nothing to train the tokenizer on")
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])

    tokenizer = Tokenizer(tok)
    tokenizer.save(out_dir)
    return tokenizer
