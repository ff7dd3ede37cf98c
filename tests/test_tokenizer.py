"""Tokenizer: byte-level round trip, special tokens, transformers compatibility, chat template, SFT mask."""

import json
import os
import random

import pytest

from nanoseek.cli import main
from nanoseek.tokenizer import (
    EOS,
    MIN_VOCAB_SIZE,
    REASONING_TOKENS,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    TokenizerError,
    copy_tokenizer,
    load_tokenizer,
    render_chat,
    train_tokenizer,
)

WORDS = ("the quick brown fox jumps over lazy dog model token attention latent expert router "
         "def return import class self value list print while for if else none true false "
         "über café naïve 東京 数据 模型 привет мир 🙂 λ ∑").split()

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "<think>greet back</think><answer>hello</answer>"}],
    [{"role": "user", "content": "café 東京 🙂\nnew line"},
     {"role": "assistant", "content": " spaced  out "},
     {"role": "user", "content": "again, with <think> in the question"},
     {"role": "assistant", "content": "ok"}],
    [{"role": "system", "content": "only a system prompt"}],
]


def make_corpus(folder, n_docs=40, seed=0):
    rng = random.Random(seed)
    paths = []
    for i in range(n_docs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(2, 6))]
        p = os.path.join(folder, f"doc{i:03d}.txt")
        with open(p, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    files = make_corpus(str(tmp_path_factory.mktemp("corpus")))
    out = str(root / "tokenizer")
    train_tokenizer(files, 400, out)
    return out


@pytest.fixture(scope="session")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


def random_texts(n=50, seed=1):
    rng = random.Random(seed)
    # any code point except surrogates (not encodable as UTF-8, so not valid text)
    pool = [c for c in range(0x20000) if not 0xD800 <= c <= 0xDFFF]
    texts = ["", " ", "\n\n\r\n\t", "  leading and trailing  ", "a" * 300, "naïve café 東京 🙂🙂",
             "\x00\x01 control", "<|user|> literal", "<thin k> <think", "ZWJ 👩‍👩‍👧 family"]
    for _ in range(n):
        texts.append("".join(chr(rng.choice(pool)) if rng.random() < 0.3 else rng.choice(WORDS + [" ", "\n"])
                             for _ in range(rng.randint(1, 40))))
    return texts


def test_round_trip_arbitrary_unicode(tok):
    for text in random_texts():
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_single_and_fixed_ids(tok):
    ids = [tok.token_id(t) for t in SPECIAL_TOKENS + REASONING_TOKENS]
    assert len(set(ids)) == len(ids)
    for t, i in zip(SPECIAL_TOKENS + REASONING_TOKENS, ids):
        assert tok.encode(t) == [i]
    # fixed ids match ModelConfig's defaults bos_token_id=0, eos_token_id=1
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    # reasoning tags are the last four ids
    assert ids[-4:] == list(range(tok.vocab_size - 4, tok.vocab_size))
    assert MIN_VOCAB_SIZE <= tok.vocab_size <= 400


def test_special_strings_in_text_are_parsed_and_never_produced_otherwise(tok):
    think = tok.token_id("<think>")
    assert think in tok.encode("reason: <think>hm</think>")
    assert tok.encode("x<think>y") == tok.encode("x") + [think] + tok.encode("y")
    special_ids = {tok.token_id(t) for t in SPECIAL_TOKENS + REASONING_TOKENS}
    for text in random_texts(seed=2) + ["<thin", "think>", "< think >", "<|user |>", "<||>"]:
        if any(t in text for t in SPECIAL_TOKENS + REASONING_TOKENS):
            continue
        assert not special_ids & set(tok.encode(text)), text


def test_encode_add_bos_and_decode_skip_special(tok):
    ids = tok.encode("hello", add_bos=True)
    assert ids[0] == tok.bos_id and ids[1:] == tok.encode("hello")
    chat = tok.encode_chat(CONVERSATIONS[1])
    text = tok.decode(chat, skip_special=True)
    assert "<|" not in text  # BOS, EOS, roles dropped
    assert "<think>greet back</think>" in text  # reasoning tags kept
    assert tok.decode(chat) == render_chat(CONVERSATIONS[1])


def test_saved_files_and_no_temp_leftovers(tok_dir):
    names = sorted(os.listdir(tok_dir))
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    with open(os.path.join(tok_dir, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    assert cfg["bos_token"] == SPECIAL_TOKENS[0] and cfg["eos_token"] == EOS
    assert "{{ bos_token }}" in cfg["chat_template"]


def test_autotokenizer_loads_and_encodes_identically(tok, hf_tok):
    assert hf_tok.bos_token_id == tok.bos_id
    assert hf_tok.eos_token_id == tok.eos_id
    assert hf_tok.pad_token_id == tok.pad_id
    assert len(hf_tok) == tok.vocab_size
    for text in random_texts(n=20, seed=3) + ["a<think>b</think><answer>4</answer>"]:
        ids = tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids
        assert hf_tok(text)["input_ids"] == ids  # no post-processor: BOS only where the template puts it
        assert hf_tok.decode(ids) == tok.decode(ids) == text
        assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special=True)


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_transformers(tok, hf_tok, conv, gen):
    ours = tok.apply_chat_template(conv, add_generation_prompt=gen)
    theirs = hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert ours == theirs
    assert ours.startswith(SPECIAL_TOKENS[0])
    assert ours.endswith(ROLE_TOKENS["assistant"]) == (gen or False)
    ids = hf_tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    assert list(ids) == tok.encode_chat(conv, add_generation_prompt=gen)


def test_chat_template_format(tok):
    text = tok.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=False)
    assert text == ("<|begin_of_sentence|><|system|>You are terse.<|user|>hi<|assistant|>"
                    "<think>greet back</think><answer>hello</answer><|end_of_sentence|>")


@pytest.mark.parametrize("conv", CONVERSATIONS[1:3])
def test_assistant_mask(tok, conv):
    ids, mask = tok.encode_chat_with_mask(conv)
    assert ids == tok.encode_chat(conv)
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    expected = "".join(m["content"] + EOS for m in conv if m["role"] == "assistant")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == expected
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    for m in conv:
        if m["role"] != "assistant":
            assert m["content"] in unmasked
    assert ids[0] == tok.bos_id and mask[0] == 0
    assert tok.token_id(ROLE_TOKENS["assistant"]) not in [i for i, m in zip(ids, mask) if m]


def test_bad_messages(tok):
    with pytest.raises(TokenizerError, match="unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(TokenizerError, match="'role' and 'content'"):
        tok.encode_chat([{"role": "user"}])
    with pytest.raises(TokenizerError, match="must be a string"):
        tok.encode_chat_with_mask([{"role": "user", "content": 3}])
    with pytest.raises(TokenizerError, match="not in this tokenizer"):
        tok.token_id("<nope>")


def test_train_errors(tmp_path):
    files = make_corpus(str(tmp_path), n_docs=2)
    with pytest.raises(TokenizerError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_tokenizer(files, MIN_VOCAB_SIZE - 1, str(tmp_path / "t"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer(files + [str(tmp_path / "missing.txt")], 300, str(tmp_path / "t"))
    with pytest.raises(ValueError, match="no input files"):
        train_tokenizer([], 300, str(tmp_path / "t"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TokenizerError, match="empty"):
        train_tokenizer([str(empty)], 300, str(tmp_path / "t"))
    assert not (tmp_path / "t").exists()  # nothing written on failure


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        copy_tokenizer(str(tmp_path), str(tmp_path / "dst"))


def test_copy_tokenizer(tok, tok_dir, tmp_path):
    dst = tmp_path / "ckpt"
    copy_tokenizer(tok_dir, str(dst))
    assert sorted(os.listdir(dst)) == sorted(os.listdir(tok_dir))  # no temp files left
    copied = load_tokenizer(str(dst))
    text = "copy café <think>"
    assert copied.encode(text) == tok.encode(text)
    assert copied.apply_chat_template(CONVERSATIONS[1]) == tok.apply_chat_template(CONVERSATIONS[1])


def test_jsonl_training_input_and_cli(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    rng = random.Random(5)
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(20))})
                              for _ in range(30)) + "\n", encoding="utf-8")
    out = tmp_path / "tk"
    main(["tokenizer", "train", "--input", str(path), "--vocab-size", "300", "--out", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["vocab_size"] == load_tokenizer(str(out)).vocab_size <= 300
    assert summary["eos_id"] == 1
    # a JSONL line without "text" is named by file and line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "oops"}\n')
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", "--input", str(bad), "--vocab-size", "300", "--out", str(tmp_path / "tk2")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("nanoseek tokenizer: error:") and "bad.jsonl:2" in err


@pytest.mark.parametrize("conv", CONVERSATIONS[1:3])
def test_assistant_mask_matches_transformers_generation_block(tok, hf_tok, conv):
    # the Jinja template marks assistant targets with {% generation %}, so transformers computes the same mask
    out = hf_tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = tok.encode_chat_with_mask(conv)
    assert list(out["input_ids"]) == ids
    assert list(out["assistant_masks"]) == mask
    assert sum(mask) > 0
