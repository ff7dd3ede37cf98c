"""Pipeline parallelism with torch.distributed.pipelining (https://pytorch.org/docs/stable/distributed.pipelining.html).

The blocks (MTP modules last) are split into contiguous stages (accounting.pipeline_stages); each rank runs one
stage (1F1B) or two (interleaved 1F1B: stages r and r + pp; DualPipeV: stages r and 2 pp - 1 - r, the V shape that
puts the first and last stages, embedding and head, on one rank as DeepSeek-V3's DualPipe does; its stages run
full backwards, full_backward_stage, and evaluate by a forward pass of their own, v_forward). Within a stage,
the stage's ranks are an ordinary (dp, ep) layout: FSDP and expert parallelism as in nanoseek.distributed.

What travels between stages: the hidden state and, when MTP is trained, the embedding of the next tokens
(Emb(t_{i+1}), computed by the first stage with the one embedding table), so the last stage's MTP module needs no
copy of the embedding and its gradient flows back to the first stage through the pipeline. The sequence-wise
balance loss of each stage's MoE layers enters the backward through its output (AttachAux), and each stage counts
its experts' tokens per micro-batch for the bias update.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nanoseek import distributed
from nanoseek.accounting import pipeline_stages
from nanoseek.config import ModelConfig
from nanoseek.fp8.modules import convert_to_fp8
from nanoseek.model.block import Block
from nanoseek.model.mtp import MTPModule
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import RotaryEmbedding
from nanoseek.model.transformer import Transformer
from nanoseek.train import balance

SCHEDULES = ("1f1b", "interleaved", "dualpipev")


def rank_stages(schedule: str, pp: int, pp_rank: int) -> tuple[int, list[int]]:
    """(number of stages, this rank's stage indices) for a schedule."""
    if schedule == "1f1b":
        return pp, [pp_rank]
    if schedule == "interleaved":
        return 2 * pp, [pp_rank, pp_rank + pp]
    if schedule == "dualpipev":
        return 2 * pp, [pp_rank, 2 * pp - 1 - pp_rank]
    raise ValueError(f"--pp-schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


class AttachAux(torch.autograd.Function):
    """Identity on x; in the backward, the scalar `aux` gets gradient 1, so a loss computed inside a stage joins
    the backward though only the stage's output is handed on (the final loss lives on the last stage)."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.aux_shape = aux.shape
        return x.clone()  # not a view: V-shaped schedules detach stage outputs in place

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones(ctx.aux_shape, device=grad.device, dtype=torch.float32)


class RankModel(nn.Module):
    """Everything one rank holds, under the Transformer's parameter names (checkpoints, initialisation and the
    optimizer see the usual names): the embedding on the first stage's rank, the blocks of its stages, and the
    final norm, head and MTP modules on the last stage's rank."""

    def __init__(self, cfg: ModelConfig, blocks: list[int], first: bool, last: bool):
        super().__init__()
        if cfg.tie_word_embeddings:  # the embedding and the head sit on different stages' ranks
            raise ValueError("--pp > 1 does not support a model with tie_word_embeddings (the `nano` preset): "
                             "train it with --pp 1")
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if first else None
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in blocks if i < cfg.num_hidden_layers})
        self.mtp = nn.ModuleList(MTPModule(cfg, i - cfg.num_hidden_layers + 1) for i in blocks
                                 if i >= cfg.num_hidden_layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if last else None
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if last else None

    # the Transformer's own methods: seeded per parameter name, so the values match the whole model's
    init_weights = Transformer.init_weights
    set_recompute = Transformer.set_recompute


class Stage(nn.Module):
    """One pipeline stage's forward over modules owned by a RankModel. Inputs: token ids (first stage) or the
    previous stage's outputs; outputs: the hidden state (plus the next tokens' embedding when MTP is trained), or
    on the last stage the logits with the MTP logits appended along the sequence (one tensor for the loss)."""

    def __init__(self, rank_model: RankModel, blocks: list[int], first: bool, last: bool, use_mtp: bool,
                 balance_alpha: float):
        super().__init__()
        cfg = rank_model.config
        self.cfg, self.first, self.last, self.use_mtp, self.alpha = cfg, first, last, use_mtp, balance_alpha
        if first:
            self.embed_tokens = rank_model.embed_tokens
        self.layers = nn.ModuleList(rank_model.layers[str(i)] for i in blocks if i < cfg.num_hidden_layers)
        self.mtp = nn.ModuleList(rank_model.mtp[i - cfg.num_hidden_layers] for i in blocks
                                 if i >= cfg.num_hidden_layers and use_mtp)
        if last:
            self.norm, self.lm_head = rank_model.norm, rank_model.lm_head
        self.rope = RotaryEmbedding(cfg)
        self.counts: torch.Tensor | None = None  # tokens per expert per MoE layer, summed over micro-batches
        self.balance_sum = 0.0

    moe_layers = Transformer.moe_layers  # this stage's, layers then MTP blocks

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None):
        if self.first:
            ids = x
            x = self.embed_tokens(ids)
            if self.use_mtp:
                emb = self.embed_tokens(ids[:, 1:])
        t = x.shape[1]
        cos, sin = self.rope(torch.arange(t, device=x.device))
        for layer in self.layers:
            x = layer(x, cos, sin)
        out = x
        if self.last:
            h = self.norm(x)
            logits = [self.lm_head(h)]
            for module in self.mtp:  # depth 1 (DeepSeek-V3's one MTP module)
                c, s = self.rope(torch.arange(t - 1, device=x.device))
                logits.append(self.lm_head(module.shared_head.norm(module(h[:, :-1], emb, c, s))))
            out = torch.cat(logits, dim=1)
        moe = self.moe_layers()
        if moe:
            counts = torch.stack([m.last_routing.counts for m in moe]).detach()
            self.counts = counts if self.counts is None else self.counts + counts
            if self.alpha > 0 and torch.is_grad_enabled():
                aux = balance.balance_loss(moe, x.shape[0], self.alpha)
                self.balance_sum += float(aux.detach())
                out = AttachAux.apply(out, aux)
        if not self.last and self.use_mtp:
            return out, emb.clone()  # a new tensor (V-shaped schedules detach outputs in place)
        return out


def stage_io(cfg: ModelConfig, first: bool, last: bool, use_mtp: bool, mb: int, t: int, dtype=torch.float32):
    """Meta tensors shaped like a stage's inputs and outputs for one micro-batch of mb sequences of t tokens, so
    the schedule need not infer them by running the stage on placeholder data (which would pollute the expert
    counts and logged losses)."""
    def act(*shape):  # activations carry gradients between stages
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=True)

    hidden = (act(mb, t, cfg.hidden_size),) + ((act(mb, t - 1, cfg.hidden_size),) if use_mtp else ())
    inputs = (torch.empty(mb, t, dtype=torch.long, device="meta"),) if first else hidden
    outputs = (act(mb, 2 * t - 1 if use_mtp else t, cfg.vocab_size),) if last else hidden
    return inputs, outputs


def split_loss(out: torch.Tensor, t: int):
    """The last stage's output back into (logits [b, t, V], MTP logits [b, t-1, V] or None)."""
    return out[:, :t], (out[:, t:] if out.shape[1] > t else None)


def loss_fn_for(mtp_lambda: float, parts: list, evaluating: dict | None = None):
    """The pipeline schedule's loss on the last stage: CE + lambda * MTP CE (the balance loss joins through
    AttachAux); (CE, MTP CE) of every micro-batch are appended to `parts` for logging. While
    evaluating["on"], the main CE alone."""

    def loss_fn(out, y):
        t = y.shape[1]
        logits, mtp = split_loss(out, t)
        main = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        if mtp is None or (evaluating or {}).get("on"):
            parts.append((main.detach(), torch.zeros(())))
            return main
        mtp_loss = F.cross_entropy(mtp.flatten(0, 1).float(), y[:, 1:].flatten())
        parts.append((main.detach(), mtp_loss.detach()))
        return main + mtp_lambda * mtp_loss

    return loss_fn


def stage_layout(cfg: ModelConfig, schedule: str, pp: int, pp_rank: int):
    """(num_stages, [(stage index, blocks, first, last)] for this rank, all blocks this rank holds)."""
    num_stages, mine = rank_stages(schedule, pp, pp_rank)
    split = pipeline_stages(cfg, num_stages)
    stages = [(s, split[s], s == 0, s == num_stages - 1) for s in mine]
    return num_stages, stages, sorted(b for _, blocks, _, _ in stages for b in blocks)


@functools.cache
def full_backward_stage():
    """PipelineStage whose backward is always the full one (input and weight gradients together); DualPipeV runs
    its stages with it. torch splits a backward into I (input gradients) and a later W (weight gradients) over the
    parameters the stage module lists when I runs, but a block FSDP resharded after its forward lists its sharded
    parameters then, not the unsharded ones in the autograd graph, so W silently dropped that micro-batch's
    gradient for every such block (seen on the MTP module, alone in the last stage with the head). W is then empty
    (the schedule keeps its V order, without deferring weight gradients into bubbles); the data-parallel gradient
    sync still runs once per step: torch's REDUCE_GRAD action after the stage's last backward, or in older torch
    inside the call flagged `last_backward`, which may be a W: that one still passes the flag on."""
    from torch.distributed.pipelining import PipelineStage

    class FullBackwardStage(PipelineStage):
        def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
            super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=True, last_backward=last_backward)

        def backward_weight_one_chunk(self, bwd_chunk_id, last_backward=False):
            if last_backward and self.has_backward:  # no weight gradient left to compute: only the sync, if any
                self.backward_maybe_with_nosync("weight", {"param_groups": []}, last_backward=True)

    return FullBackwardStage


def make_schedule(schedule: str, stages: list, n_microbatches: int, loss_fn):
    from torch.distributed import pipelining as pl

    if schedule == "1f1b":
        return pl.Schedule1F1B(stages[0], n_microbatches, loss_fn=loss_fn)
    if schedule == "interleaved":
        return pl.ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn)
    if not hasattr(pl, "ScheduleDualPipeV"):
        raise ValueError(f"--pp-schedule dualpipev needs torch.distributed.pipelining.ScheduleDualPipeV (torch >= "
                         f"2.9; this is {torch.__version__}): use 1f1b or interleaved")
    return pl.ScheduleDualPipeV(stages, n_microbatches, loss_fn=loss_fn)


def v_forward(stages: list[Stage], indices: list[int], pp: int, group, x: torch.Tensor):
    """Forward only through DualPipeV's V-shaped stages (torch's ScheduleDualPipeV has no forward-only step), the
    whole batch stage after stage with point-to-point send / recv on the pipeline group: rank r runs stage r and
    sends its outputs to rank r + 1, rank pp - 1 runs stages pp - 1 and pp, and the way back down ends on rank 0,
    whose last stage's output is returned (None on the other ranks). `x`: the token ids, used by stage 0."""
    def owner(s):
        return s if s < pp else 2 * pp - 1 - s

    me, out = owner(indices[0]), ()
    for st, s in zip(stages, indices):  # stage r, then 2 pp - 1 - r: in the order the data flows
        if st.first:
            args = (x,)
        elif owner(s - 1) == me:  # the V's turn, on rank pp - 1
            args = out
        else:
            shapes, _ = stage_io(st.cfg, False, st.last, st.use_mtp, x.shape[0], x.shape[1])
            args = tuple(torch.empty(t.shape, dtype=t.dtype, device=x.device) for t in shapes)
            for t in args:
                dist.recv(t, group=group, group_src=owner(s - 1))
        out = st(*args)
        out = out if isinstance(out, tuple) else (out,)
        if not st.last and owner(s + 1) != me:
            for t in out:
                dist.send(t.contiguous(), group=group, group_dst=owner(s + 1))
    return out[0] if stages[-1].last else None


# ------------------------------------------------------------------------------------------ a rank's pipeline run
@dataclass
class RankPipeline:
    """One rank's share of a pipeline-parallel training run (build_rank_pipeline)."""

    rank_model: RankModel
    stages: list[Stage]
    schedule: object
    parts: list  # (CE, MTP CE) of every micro-batch the last stage ran (loss_fn_for)
    evaluating: dict  # {"on": True} while evaluate runs: the loss is the main CE alone
    device: torch.device
    stage_size: int  # ranks per stage; they split every batch
    stage_rank: int
    n_micro: int
    n_moe: int  # MoE layers of the whole model a step routes (layers, then MTP when trained)
    moe_rows: list[list[int]]  # per stage of this rank: its MoE layers' rows in the global counts
    has_first: bool
    has_last: bool
    forward_only: object = None  # x -> last stage's output or None, for a schedule without eval() (v_forward)

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch (the stage's ranks split it; every stage sees the same batch)."""
        return t.tensor_split(self.stage_size)[self.stage_rank].to(self.device)

    def run(self, fn, x: torch.Tensor, y: torch.Tensor):
        """schedule.step or .eval with the inputs this rank's stages take: ids on the first, targets on the last."""
        return fn(*((x,) if self.has_first else ()), target=y if self.has_last else None)


def build_rank_pipeline(tc, cfg: ModelConfig, info, recipe=None) -> RankPipeline:
    """This rank's stages of the model, sharded over the stage's ranks and initialised (the values of the
    whole model's parameters of the same names), and the schedule that runs them. `tc`: pretrain's
    TrainConfig (pp, ep, pp_schedule, pp_microbatches, batch_size, seq_len, mtp_lambda, balance_alpha, seed,
    recompute, eval_every)."""
    from torch.distributed.pipelining import PipelineStage

    mesh, stage_mesh = distributed.make_pipeline_mesh(info, tc.pp, tc.ep)
    stage_size = info.world_size // tc.pp
    pp_rank = info.rank // stage_size
    n_micro = tc.pp_microbatches or 2 * tc.pp
    if tc.batch_size % stage_size or (tc.batch_size // stage_size) % n_micro:
        raise ValueError(f"--batch-size {tc.batch_size} must split into {stage_size} ranks per stage x {n_micro} "
                         "pipeline micro-batches")
    use_mtp = tc.mtp_lambda > 0 and cfg.num_nextn_predict_layers > 0
    num_stages, layout, blocks = stage_layout(cfg, tc.pp_schedule, tc.pp, pp_rank)
    has_first, has_last = any(f for _, _, f, _ in layout), any(la for _, _, _, la in layout)
    with torch.device("meta"):
        rank_model = RankModel(cfg, blocks, has_first, has_last)
        stages = [Stage(rank_model, b, f, la, use_mtp, tc.balance_alpha) for _, b, f, la in layout]
    if recipe:
        convert_to_fp8(rank_model, recipe)
    distributed.parallelize_pipeline(rank_model, stages, mesh, stage_mesh, tc.ep)
    rank_model.to_empty(device=info.device)
    rank_model.init_weights(tc.seed)  # the same values as the whole model's parameters of these names
    rank_model.set_recompute(tc.recompute)
    rank_model.train()
    for st in stages:
        st.train()
    mb = tc.batch_size // stage_size // n_micro
    pipe_stages = []
    for st, (s, _, first, last) in zip(stages, layout):
        inputs, outputs = stage_io(cfg, first, last, use_mtp, mb, tc.seq_len)
        stage_cls = full_backward_stage() if tc.pp_schedule == "dualpipev" else PipelineStage
        pipe_stages.append(stage_cls(st, s, num_stages, info.device, input_args=inputs, output_args=outputs,
                                     group=mesh["pp"].get_group()))
    parts: list = []
    evaluating = {"on": False}
    schedule = make_schedule(tc.pp_schedule, pipe_stages, n_micro, loss_fn_for(tc.mtp_lambda, parts, evaluating))
    forward_only = None
    if tc.pp_schedule == "dualpipev":
        forward_only = functools.partial(v_forward, stages, [s for s, _, _, _ in layout], tc.pp,
                                         mesh["pp"].get_group())
    elif tc.eval_every and not hasattr(schedule, "eval"):
        raise ValueError(f"evaluation with --pp needs the pipeline schedules' eval() (torch >= 2.7; this is "
                         f"{torch.__version__}): set --eval-every 0")
    moe_blocks = [i for i in range(cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if use_mtp else 0))
                  if cfg.is_moe_layer(i)]
    moe_rows = [[moe_blocks.index(i) for i in b if i in moe_blocks] for _, b, _, _ in layout]
    return RankPipeline(rank_model, stages, schedule, parts, evaluating, info.device, stage_size,
                        info.rank % stage_size, n_micro, len(moe_blocks), moe_rows, has_first, has_last, forward_only)


def train_step(rp: RankPipeline, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, list[torch.Tensor]]:
    """Forward and backward of one global batch [B, T] through the schedule. Returns the loss parts as the
    1-process run logs them and every MoE layer's expert counts over the global batch (identical on all ranks)."""
    rp.parts.clear()
    for st in rp.stages:
        st.counts, st.balance_sum = None, 0.0
    rp.run(rp.schedule.step, rp.local(x), rp.local(y))
    # losses: the last stage's CE and MTP CE, every stage's balance loss; each averaged over its stage's ranks and
    # summed over stages (a sum over all ranks of the per-rank share)
    local = torch.zeros(3, dtype=torch.float64)
    if rp.parts:
        local[0] = sum(float(a) for a, _ in rp.parts) / len(rp.parts)
        local[1] = sum(float(b) for _, b in rp.parts) / len(rp.parts)
    local[2] = sum(st.balance_sum for st in rp.stages) / rp.n_micro
    reduced = distributed.all_reduce_sum((local / rp.stage_size).to(rp.device)).cpu().tolist()
    counts = torch.zeros(rp.n_moe, rp.rank_model.config.n_routed_experts, dtype=torch.long)
    for st, rows in zip(rp.stages, rp.moe_rows):  # each stage fills its own layers' rows
        if st.counts is not None:
            counts[rows] += st.counts.cpu()[: len(rows)]
    counts = distributed.all_reduce_sum(counts.to(rp.device)).cpu()
    return dict(zip(("loss", "mtp_loss", "balance_loss"), reduced)), list(counts)


def update_bias(rp: RankPipeline, counts: list[torch.Tensor], gamma: float) -> None:
    """The auxiliary-loss-free bias update of this rank's MoE layers from the global counts (train_step)."""
    for st, rows in zip(rp.stages, rp.moe_rows):
        balance.update_bias(st.moe_layers(), [counts[r] for r in rows], gamma)


@torch.no_grad()
def evaluate(rp: RankPipeline, val, batch_size: int, eval_batches: int) -> float:
    """As pretrain.evaluate: mean validation CE over the first eval_batches batches, forward only through the
    pipeline."""
    rp.evaluating["on"] = True
    for st in rp.stages:
        st.eval()
    total, n = 0.0, 0
    try:
        for i, (x, y) in enumerate(val.iter_sequential(batch_size)):
            if i >= eval_batches:
                break
            real = torch.arange(batch_size) < x.shape[0]  # a short last batch is padded (fixed shapes)
            pad = batch_size - x.shape[0]
            x, y = (torch.cat([t, t[:1].expand(pad, -1)]) for t in (x, y))
            x, y, real = rp.local(x), rp.local(y), rp.local(real)
            out = rp.forward_only(x) if rp.forward_only else rp.run(rp.schedule.eval, x, y)
            if rp.has_last:  # the last stage's outputs, micro-batches merged back into this rank's batch
                logits, _ = split_loss(out, y.shape[1])
                total += F.cross_entropy(logits[real].flatten(0, 1).float(), y[real].flatten(),
                                         reduction="sum").item()
                n += y[real].numel()
    finally:
        rp.evaluating["on"] = False
        for st in rp.stages:
            st.train()
    total, n = distributed.all_reduce_sum(torch.tensor([total, float(n)], dtype=torch.float64,
                                                        device=rp.device)).tolist()
    return total / max(1.0, n)
