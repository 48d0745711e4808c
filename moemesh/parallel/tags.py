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
