"""The teacher of a distillation (DeepSeek-R1 section 2.4; GKD, arXiv 2306.13649): its logits must index the
student's vocabulary, so both must share the tokenizer; checked before any work."""

from __future__ import annotations

from nanoseek.config import ModelConfig
from nanoseek.tokenizer import load_tokenizer


def check_same_tokenizer(teacher: str, student: str) -> None:
    """Raise ValueError, saying what differs, unless the two checkpoints share the tokenizer (vocabulary, BOS /
    EOS / PAD, special tokens) and the models the vocabulary size: the teacher's logits must index the student's."""
    t, s = load_tokenizer(teacher), load_tokenizer(student)
    diffs = []
    if t.vocab_size != s.vocab_size:
        diffs.append(f"vocabulary size {t.vocab_size} (teacher) vs {s.vocab_size} (student)")
    else:
        tv, sv = t.tok.get_vocab(with_added_tokens=True), s.tok.get_vocab(with_added_tokens=True)
        moved = sorted(k for k in tv if sv.get(k) != tv[k])
        if moved:
            diffs.append(f"{len(moved)} tokens have other ids or are missing in the student (e.g. {moved[0]!r})")
    for name in ("bos", "eos", "pad"):
        tt, st = getattr(t, f"{name}_token"), getattr(s, f"{name}_token")
        if tt != st:
            diffs.append(f"{name.upper()} token {tt!r} (teacher) vs {st!r} (student)")
        elif t.tok.token_to_id(tt) != s.tok.token_to_id(st):
            diffs.append(f"{name.upper()} id {t.tok.token_to_id(tt)} (teacher) vs {s.tok.token_to_id(st)} (student)")
    ts = {a.content for a in t.tok.get_added_tokens_decoder().values() if a.special}
    ss = {a.content for a in s.tok.get_added_tokens_decoder().values() if a.special}
    if ts != ss:
        diffs.append(f"special tokens only in the teacher: {sorted(ts - ss)}, only in the student: {sorted(ss - ts)}")
    tc, sc = ModelConfig.from_json(teacher), ModelConfig.from_json(student)
    if tc.vocab_size != sc.vocab_size:
        diffs.append(f"model vocab_size {tc.vocab_size} (teacher) vs {sc.vocab_size} (student)")
    if diffs:
        raise ValueError(f"teacher {teacher} and student {student} do not share a tokenizer: " + "; ".join(diffs)
                         + ". Distill only into a student pretrained with the teacher's tokenizer (pass the "
                           "teacher's tokenizer directory to `nanoseek data prepare`).")
