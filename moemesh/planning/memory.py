"""What one rank of a pipeline stage holds, for the planner (cost.py): training
state, transient buffers and activations, and the FLOPs activation checkpointing repeats.

Per GPU, rank 0 of its shard groups (it holds the largest chunk of every sharded tensor):

  parameters, gradients, AdamW state (exact: a test builds the real model on the meta
            device for every preset and mode, shards it, and compares each rank's local
            bytes with these). State is fp32 in every mode and precision: autocast (none on
            the GPU) computes in bf16 from fp32 weights; FSDP2 (zero2, zero3) keeps fp32
            sharded master weights, fp32 gradients and fp32 AdamW state under
            MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32). So 4 + 4 + 8 bytes per
            parameter the rank keeps, plus AdamW's 4-byte step per tensor. none keeps every
            parameter of its EP / TP / PP share; zero2 and zero3 keep a 1/k chunk of each
            (torch.chunk: ceil(n/k) rows), k the ranks holding the same weights: dp x ep for
            non-expert parameters, dp x tp for routed experts, dp x ep x tp for the router (and
            the norms under sequence parallelism) when tp > 1 (moemesh/moe/param_count.py).
  transient (gathered weights and gradients in flight at the peak, c = the compute dtype's
            bytes: 2 for bf16, 4 for fp32; g = c + 4 under bf16, whose gradients are cast to
            fp32 for the reduction, else 4):
              none   fp32: nothing. bf16: autocast's bf16 copies of the matmul weights (all but
                     the embedding and the router, which stays fp32): held to the end of the
                     forward by its cast cache and saved for the backward (the experts' copies,
                     made by the experts themselves, only when not checkpointed): c x those.
              zero2  every parameter of the stage gathered from its forward to its backward
                     (reshard_after_forward=False): c x the stage, + one block's gathered
                     gradients: g x the largest block.
              zero3  the root unit (embedding, final norm, head: gathered for the whole forward
                     and the whole backward, as the root's forward is the model's) + two blocks
                     (the one computing and the one prefetched): c x (root + 2 x largest block),
                     + g x the largest block's (or root's) gradients.
  activations (an estimate, elements of the compute dtype per micro-batch in flight; see
            block_activations for each named part), + the last stage's final norm and the fp32
            log-softmax the loss keeps. With checkpointing each block keeps only what the mode
            keeps (full: its input and the outputs of its collectives, which are never
            recomputed; selective: also the attention output and the expert matmuls' outputs),
            and one block at a time is recomputed for its backward. 1F1B holds pp micro-batches
            in flight on the first stage; GPipe holds all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moemesh.fields import QKNorm, Recompute, Sharding
from moemesh.moe.config import ModelConfig, head_dim, is_moe_layer
from moemesh.moe.param_count import Flops, ParamSpec, attention_width, local_numel, param_specs
from moemesh.parallel.dims import ParallelDims, padded_vocab

# Bytes per element of the training state, in every mode and precision (see the docstring).
PARAM_BYTES, GRAD_BYTES, ADAM_BYTES, ADAM_STEP_BYTES = 4, 4, 8, 4
REDUCE_BYTES = 4  # gradients are reduced in fp32 (FSDP2's reduce_dtype; the fp32 grads of none)
# The residual stream and what is read from it (the norms' outputs) and their gradients stay fp32
# under bf16 autocast: the fp32 embedding starts it, autocast covers only the products. (Under
# sharding FSDP gathers the weights in the compute dtype, and the stream is in it: cost.residual_bytes.)
RESIDUAL_BYTES = 4


@dataclass(frozen=True)
class StageState:
    """Bytes one rank of a stage keeps at rest: (expert, non-expert) for each kind."""

    params: tuple[int, int]
    grads: tuple[int, int]
    optim: tuple[int, int]


def stage_state(specs: list[ParamSpec], dims: ParallelDims, sharding: str) -> StageState:
    """Rank 0's local bytes (the most any rank of the stage holds): fp32 parameters and
    gradients of its chunk of each tensor, AdamW's exp_avg and exp_avg_sq of the same size
    and a 4-byte step per tensor."""
    sharded = sharding != Sharding.none

    def part(expert: bool, per_elem: int, per_tensor: int = 0) -> int:
        return sum(local_numel(s, dims, sharded) * per_elem + per_tensor for s in specs if s.expert == expert)

    return StageState(
        params=(part(True, PARAM_BYTES), part(False, PARAM_BYTES)),
        grads=(part(True, GRAD_BYTES), part(False, GRAD_BYTES)),
        optim=(part(True, ADAM_BYTES, ADAM_STEP_BYTES), part(False, ADAM_BYTES, ADAM_STEP_BYTES)),
    )


def _block_numel(specs: list[ParamSpec]) -> dict[int | None, int]:
    """Unsharded elements per transformer block (None: the root's embedding, final norm, head)."""
    out: dict[int | None, int] = {}
    for s in specs:
        out[s.layer] = out.get(s.layer, 0) + s.numel
    return out


def transient_bytes(specs: list[ParamSpec], sharding: str, ckpt: str, compute_bytes: int) -> int:
    """Gathered weights and gradients alive at the peak, beyond the state at rest (docstring)."""
    return sum(transient_parts(specs, sharding, ckpt, compute_bytes))


def transient_parts(specs: list[ParamSpec], sharding: str, ckpt: str, compute_bytes: int) -> tuple[int, int]:
    """transient_bytes' two parts: (gathered or cast weights, gradients in flight)."""
    c = compute_bytes
    g = REDUCE_BYTES + (c if c != REDUCE_BYTES else 0)  # bf16 grads + their fp32 cast for the reduction
    blocks = _block_numel(specs)
    root = blocks.pop(None, 0)
    largest = max(blocks.values(), default=0)
    if sharding == Sharding.none:
        if c == 4:
            return 0, 0
        cast = sum(
            s.numel
            for s in specs
            if not s.expert and len(s.shape) > 1 and not s.name.startswith("embed.") and ".router." not in s.name
        )
        saved_experts = sum(s.numel for s in specs if s.expert) if ckpt == Recompute.none else 0
        return c * (cast + saved_experts), 0
    if sharding == Sharding.zero2:
        return c * (root + sum(blocks.values())), g * largest
    return c * (root + 2 * largest), g * max(largest, root)


@dataclass(frozen=True)
class BlockActivations:
    """What one transformer block stores for its backward, per micro-batch, in elements of
    the compute dtype, by the part each checkpointing mode keeps (``kept``)."""

    block_input: int  # the residual stream entering the block: every mode keeps it
    attention_out: int  # scaled_dot_product_attention's output: selective keeps it
    expert_out: int  # the expert matmuls' outputs (w1, w3, w2): selective keeps them
    rest: int  # everything else the block stores without checkpointing (recomputed with it)
    # Outputs of the block's All-to-Alls and TP collectives that checkpointing keeps so that
    # recomputing never repeats a collective. Without checkpointing backward keeps only some
    # of them (counted in ``rest`` where it does).
    collectives: int

    @property
    def total(self) -> int:
        """Stored without checkpointing."""
        return self.block_input + self.attention_out + self.expert_out + self.rest

    def kept(self, ckpt: str) -> int:
        """Elements kept through the forward under ``trainer.activation_checkpointing=ckpt``."""
        if ckpt == Recompute.none:
            return self.total
        full = self.block_input + self.collectives
        return full if ckpt == Recompute.full else full + self.attention_out + self.expert_out

    def recomputed(self, ckpt: str) -> int:
        """Elements the block's recompute makes again for its backward (alive one block at a time)."""
        if ckpt == Recompute.none:
            return 0
        return self.rest + (self.attention_out + self.expert_out if ckpt == Recompute.full else 0)


def block_activations(m: ModelConfig, layer: int, T: int, dims: ParallelDims, sp: bool) -> BlockActivations:
    """One block's stored activations for a micro-batch of T tokens per data rank.

    t = tp; s = t with sequence parallelism, else 1 (the residual stream's split);
    Dq = H Dh and Dkv = G Dh the attention widths (Dh = model.head_dim, hidden_size / H by
    default); Tr = T / t tokens this rank routes, N = Tr K routed rows (uniform routing; (ep-1)/ep
    of them cross the All-to-All). Per part, counting the tensors autograd saves (checked against
    a real CPU forward's in tests/parallel/test_recompute.py and tests/planning/test_plan.py):
      block_input           T D / s (the residual; the attention norm's input)
      norms                 each RMSNorm's normalised input 2 T D / s, the FFN norm's input (the
                            mid-block residual) T D / s
      attention             its input: the norm output T D (under SP its sequence gather, which
                            q, k and v share, T D); q, k, v after RoPE (Dq + 2 Dkv) T / t; the
                            output projection's input Dq T / t. qk-norm (either kind): q's and k's
                            projections and normalised values 2 (Dq + Dkv) T / t, and their
                            inverse RMS, (H + G) T / t per head or 2 T over the projection (whose
                            summed squares are all-reduced over tp: 2 T more collective outputs).
                            Biases store nothing.
      attention_out         Dq T / t
      dense FFN             its input T D (under SP the gather w1 and w3 share); 4 T F / t:
                            w1 and w3 outputs, silu's output, their product
      MoE                   the router's input T D / s (with t > 1 and no SP a slice of the
                            norm output, which keeps all of it alive), logits and scores 2 Tr E; the experts'
                            input rows N D (the experts keep no more: silu and the product are
                            recomputed in their backward, moe/experts.py); the rows the
                            unpermute weights N D; a shared expert's input (under SP its gather
                            T D; with t > 1 otherwise the norm output T D) and 4 T Fs / t;
                            its gate's sigmoid and the ungated output (D + 1) T / s
      expert_out            N (2 Fe + D): w1, w3 and w2 outputs
      collectives           ep > 1: the dispatch and combine All-to-All outputs, N D each;
                            t > 1: each sequence gather's or all-reduce's output T D (one for
                            attention, one for a dense FFN or shared expert, and without SP the
                            MoE's token gather, which a shared expert's output all-reduce is)
                            and each reduce-scatter's T D / t
    """
    D, t = m.hidden_size, dims.tp
    s = t if sp else 1
    block_input = T * D // s
    norms = 2 * T * D // s + T * D // s
    attention_out, attention, collectives = _attention_activations(m, T, t, sp)
    rest = norms + attention
    full_outs, scattered = (1, 1) if sp else (1, 0)  # TP collectives' outputs: T D and T D / t each
    expert_out = 0
    if is_moe_layer(m, layer):
        Tr = T // t
        N = Tr * m.top_k
        Fe, Fs = m.moe_ffn_hidden_size, m.shared_expert_ffn_size
        rest += T * D // s + 2 * Tr * m.num_experts + N * D + N * D
        expert_out = N * (2 * Fe + D)
        if Fs:
            rest += (T * D if t > 1 else 0) + 4 * T * Fs // t
            rest += (D + 1) * T // s if m.shared_expert_gate else 0
            full_outs, scattered = full_outs + 1, scattered + (1 if sp else 0)
        if not sp and not Fs:
            full_outs += 1  # the routed tokens gathered back (a shared expert's all-reduce carries them)
        if dims.ep > 1:
            collectives += 2 * N * D
    else:
        rest += T * D + 4 * T * m.ffn_hidden_size // t
        full_outs, scattered = full_outs + 1, scattered + (1 if sp else 0)
    collectives += full_outs * T * D + scattered * T * D // t if t > 1 else 0
    return BlockActivations(block_input, attention_out, expert_out, rest, collectives)


def _attention_activations(m: ModelConfig, T: int, t: int, sp: bool) -> tuple[int, int, int]:
    """Attention's (output kept by selective checkpointing, the rest, collective outputs beyond
    the projections' gathers and reductions): block_activations' "attention" and "attention_out"."""
    Dh = head_dim(m)
    H, G = m.num_heads, m.num_kv_heads
    Dq, Dkv = H * Dh, G * Dh
    rest = T * m.hidden_size + (T * Dq + 2 * T * Dkv) // t + T * Dq // t
    collectives = 0
    if m.qk_norm == QKNorm.head:
        rest += 2 * T * (Dq + Dkv) // t + T * (H + G) // t
    elif m.qk_norm == QKNorm.full:
        rest += 2 * T * (Dq + Dkv) // t + 2 * T
        collectives += 2 * T if t > 1 else 0
    return T * Dq // t, rest, collectives


def activation_bytes(
    m: ModelConfig, layers: Sequence[int], T: int, dims: ParallelDims, sp: bool, ckpt: str, in_flight: float, c: int
) -> int:
    """A pipeline rank's activations (``layers``: every layer it holds): ``in_flight`` micro-batches
    of all of them (``in_flight_stages``) keep every block's ``kept`` part; with checkpointing one
    block at a time is recomputed for its backward; the rank with the last layer also holds one
    micro-batch's final norm (its input, normalised input and output, 3 T D) and the fp32
    log-softmax of the logits its loss saves (T V / t, 4 bytes)."""
    acts = [block_activations(m, l, T, dims, sp) for l in layers]
    kept = int(sum(a.kept(ckpt) for a in acts) * in_flight)
    recompute = max((a.recomputed(ckpt) for a in acts), default=0)
    head = 0
    if m.num_layers - 1 in layers:
        head = 3 * T * m.hidden_size * c + T * padded_vocab(m.vocab_size, dims.tp) // dims.tp * 4
    return (kept + recompute) * c + head


def recompute_flops_per_token(
    m: ModelConfig,
    seq_len: int,
    ckpt: str,
    pp: int = 1,
    stage: int = 0,
    *,
    layers: Sequence[int] | None = None,
    shared_expert_last: bool = True,
) -> Flops:
    """Forward FLOPs activation checkpointing repeats, per token of the global batch, in the blocks
    of pipeline stage ``stage`` of ``pp`` (or of ``layers``, a pipeline rank's), with the routed
    experts' and the attention core's parts: 2 x the blocks' active parameters (full; selective
    leaves out the routed experts, whose outputs it keeps) + full's 4 x blocks x hidden x sequence
    for the attention core (a third of PaLM's 12, which selective keeps too).

    The recompute stops once it has remade every tensor the backward reads (torch's non-reentrant
    checkpoint stops early), so a block's last projection, whose output nothing saves, is not
    repeated: a dense FFN's w2, and an ungated shared expert's w2 where the shared expert runs
    after the routed experts (``shared_expert_last``: not hidden under an All-to-All). Checked
    against the FLOPs a checkpointed backward runs in tests/parallel/test_recompute.py."""
    if ckpt == Recompute.none:
        return Flops(0.0, 0.0, 0.0)
    specs = [s for s in param_specs(m, ParallelDims(pp=pp), stage=stage, layers=layers) if s.layer is not None]
    shared_last = shared_expert_last and not m.shared_expert_gate
    dense = sum(s.numel for s in specs if not s.expert and not _unsaved_last(s.name, shared_last))
    if ckpt == Recompute.selective:
        return Flops(2.0 * dense, 0.0, 0.0)
    experts = 2.0 * sum(s.numel for s in specs if s.expert) * m.top_k / m.num_experts
    core = 4.0 * len({s.layer for s in specs}) * attention_width(m) * seq_len
    return Flops(2.0 * dense + experts + core, experts, core)


def _unsaved_last(name: str, shared_last: bool) -> bool:
    """Whether parameter ``name`` is a block's last projection, which a recompute leaves out."""
    return name.endswith(".ffn.w2.weight") or (shared_last and name.endswith(".moe.shared.w2.weight"))
