"""Parameter tags: how a parameter is split and whose gradients it sums.

The model marks its parameters with these attributes where it builds them; the
gradient reducer, the grad norm and the checkpoint read the tags, never the
module classes, so the parallel layer needs nothing from ``moemesh.moe``.
"""

TP_SHARD = "_moemesh_tp_shard"  # (dim, logical size along dim): sharded over tp
GRAD_GROUP = "_moemesh_grad_group"  # "data" (default) | "data_tp" | "expert"
# Global id of the expert at dim 0 index 0: dim 0 indexes this rank's experts
# first, first + 1, ... (an EP shard of the full [E, ...] tensor).
EXPERT_SHARD = "_moemesh_expert_shard"


def expert_first_id(param) -> int | None:
    """The global id of ``param``'s first expert, or None for a non-expert parameter."""
    return getattr(param, EXPERT_SHARD, None)


def shard_dim(shape: tuple[int, ...], *, expert: bool, tp_dim: int | None, tp_size: int, group_size: int) -> int:
    """The dimension the sharded modes (parallel.sharding, FSDP2) split a parameter along:
    dim 0, except experts whose local count does not divide over their group (dim 1), and a
    tensor TP already splits along dim 0 (dim 1, so a checkpoint can describe both splits
    as one 2-D DTensor). One rule for ``parallel.fsdp`` and the planner's byte counts."""
    if len(shape) < 2:
        return 0
    if expert:
        return 0 if shape[0] % group_size == 0 else 1
    return 1 if tp_size > 1 and tp_dim == 0 else 0
