"""SFT: loss only on assistant tokens, packing that is exact (a packed conversation gets its solo logits), a few
steps lower the loss, data formats, and exact resume. Tiny random model, bytes-only tokenizer, one thread."""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from nanoseek import Transformer
from nanoseek.tokenizer import load_tokenizer
from nanoseek.train import sft
from nanoseek.train.loop import read_metrics
from test_grpo import tiny_checkpoint




@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("sft"))


CONVS = [
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+3?"},
     {"role": "assistant", "content": "<think>2+3=5</think> <answer>5</answer>"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": "hello again"}],
    [{"role": "user", "content": "7*6?"},
     {"role": "assistant", "content": "<think>7*6=42</think> <answer>42</answer>"}],
]


def write_data(path, n_repeat=3):
    with open(path, "w") as f:
        for _ in range(n_repeat):
            for c in CONVS:
                f.write(json.dumps({"messages": c}) + "\n")
            f.write(json.dumps({"prompt": "9-4?", "completion": "<think>9-4=5</think> <answer>5</answer>"}) + "\n")
    return str(path)


def packed(ckpt, seq_len=128):
    tok = load_tokenizer(ckpt)
    enc = [tok.encode_chat_with_mask(c) for c in CONVS]
    return tok, enc, sft.pack(enc, seq_len, tok.pad_id)


@torch.no_grad()
def solo_logits(model, ids):
    """A conversation alone: a plain causal forward from position 0, no mask, no packing. [len(ids), vocab]."""
    return model(torch.tensor([ids]))[0].float()


def test_loss_is_the_mean_ce_over_assistant_tokens_of_each_conversation_alone(ckpt):
    """sft_loss on a packed row equals, built by hand from solo forwards, the cross-entropy summed over the
    tokens whose mask is 1 (assistant content and its EOS; never system or user tokens), divided by their count."""
    model = Transformer.from_pretrained(ckpt).eval()
    tok, enc, rows = packed(ckpt)
    with torch.no_grad():
        loss, n = sft.sft_loss(model, rows.ids, rows.target, rows.positions, rows.doc)
    total, count, total_all = 0.0, 0, 0.0
    for ids, m in enc:
        ce = F.cross_entropy(solo_logits(model, ids)[:-1], torch.tensor(ids[1:]), reduction="none")
        keep = torch.tensor(m[1:], dtype=torch.bool)  # token j is a target iff its mask is 1
        assert 0 < keep.sum() < len(keep)  # both kinds of token are present
        total, count, total_all = total + float(ce[keep].sum()), count + int(keep.sum()), total_all + float(ce.sum())
    assert n == count
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    assert abs(total_all / count - total / count) > 0.1  # what counting the other tokens too would give
    user_tok = enc[0][0].index(tok.token_id("<|user|>")) + 1  # first token of the user's text, row 0
    assert not rows.target[0, user_tok]


def test_packing_is_exact(ckpt):
    """All three conversations share one row; each gets exactly the logits it gets alone."""
    model = Transformer.from_pretrained(ckpt).eval()
    tok, enc, rows = packed(ckpt)
    assert rows.ids.shape[0] == 1 and set(rows.doc[0].tolist()) == {-1, 0, 1, 2}
    assert rows.target.sum() == sum(sum(m) for _, m in enc)
    seen = []
    hook = model.register_forward_hook(lambda mod, args, out: seen.append(out.float()))
    try:
        with torch.no_grad():
            sft.sft_loss(model, rows.ids, rows.target, rows.positions, rows.doc)
    finally:
        hook.remove()
    (packed_logits,) = seen
    doc = rows.doc[0, :-1]  # the inputs' documents
    for d, (ids, _) in enumerate(enc):
        at = doc.tolist().index(d)
        assert rows.ids[0, at:at + len(ids)].tolist() == ids
        got = packed_logits[0, doc == d]
        want = solo_logits(model, ids)[: got.shape[0]]
        assert got.shape[0] >= len(ids) - 1
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # first-fit: a row fills before a new one opens; a too-long conversation is cut and counted
    small = sft.pack(enc, 40, tok.pad_id)
    assert small.truncated == sum(len(i) > 41 for i, _ in enc)
    assert all(int((small.doc[r] >= 0).sum()) <= 41 for r in range(small.ids.shape[0]))


def test_a_few_steps_lower_the_loss(ckpt, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    s = sft.train(sft.SFTConfig(model=ckpt, data=data, out=str(tmp_path / "run"), steps=12, batch_size=2,
                                seq_len=160, lr=3e-3, warmup=1), progress=False)
    rows = read_metrics(str(tmp_path / "run"))
    assert s["conversations"] == 12 and s["truncated"] == 0
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    assert os.path.isfile(tmp_path / "run" / "latest" / "tokenizer.json")
    assert os.path.isfile(tmp_path / "run" / "latest" / "optimizer.safetensors")


def test_resume_reproduces_the_uninterrupted_run(ckpt, tmp_path):
    data = write_data(tmp_path / "d.jsonl")
    kw = dict(model=ckpt, data=data, steps=6, batch_size=2, seq_len=160, lr=3e-3, save_every=3)
    sft.train(sft.SFTConfig(out=str(tmp_path / "full"), **kw), progress=False)
    os.makedirs(tmp_path / "cut" / "checkpoints")
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_3", tmp_path / "cut" / "checkpoints" / "step_3")
    with open(tmp_path / "cut" / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in read_metrics(str(tmp_path / "full"))[:3])
    sft.train(sft.SFTConfig(out=str(tmp_path / "cut"), resume=True, **kw), progress=False)
    strip = lambda rs: [(r["step"], r["loss"], r["grad_norm"]) for r in rs]  # noqa: E731
    assert strip(read_metrics(str(tmp_path / "cut"))) == strip(read_metrics(str(tmp_path / "full")))
    a = Transformer.from_pretrained(tmp_path / "full" / "latest").state_dict()
    b = Transformer.from_pretrained(tmp_path / "cut" / "latest").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="the schedule would change"):
        sft.train(sft.SFTConfig(out=str(tmp_path / "cut"), resume=True, **{**kw, "steps": 9}), progress=False)


def test_data_formats_and_errors(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"prompt": "q", "completion": "a", "system": "s"}) + "\n\n")
    assert sft.load_conversations(str(p)) == [[{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a"}]]
    p.write_text(json.dumps({"text": "no"}) + "\n")
    with pytest.raises(ValueError, match="x.jsonl:1"):
        sft.load_conversations(str(p))
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(ValueError, match="no assistant message"):
        sft.load_conversations(str(p))
    with pytest.raises(FileNotFoundError):
        sft.load_conversations(str(tmp_path / "missing.jsonl"))
    assert sft.batch_indices(3, 4, 5, 0) == sft.batch_indices(3, 4, 5, 0)
    epoch0 = [i for s in (1, 2) for i in sft.batch_indices(s, 2, 4, 0)]
    assert sorted(epoch0) == [0, 1, 2, 3]  # one epoch visits every row once
