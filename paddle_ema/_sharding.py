"""Which parameters a rank's ModelEMA averages under Paddle's dygraph sharding, and the broadcasts
that give every rank the averages the others own.

The EMA is elementwise, so under a sharded optimizer each rank averages only the parameters its
optimizer partition updates (and what is not partitioned: buffers, frozen parameters), with no
communication per update; the full averages are gathered only where a full model is needed
(``averages()``, ``apply()``, a consolidated state). A :class:`Partition` reads the partition from
the optimizer once:

* fleet hybrid parallel with ``sharding_degree`` (``DygraphShardingOptimizer``, stage 1): its
  ``_param2rank`` (parameter name to sharding rank) and the hybrid communicate group's sharding
  group (``_hcg.get_sharding_parallel_group()``), as its own parameter broadcast reads them;
* ``paddle.distributed.sharding.group_sharded_parallel`` at levels ``"os"`` and ``"os_g"``
  (``GroupShardedOptimizerStage2``): its ``param2rank`` and ``_group``.

Private attributes, present from Paddle 2.6 to 3.3. Sharding that splits parameters themselves
(stage 3 ``"p_g_os"``, fleet's ``DygraphShardingOptimizerV2``/``split_param``, tensor fusion) is
refused with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import paddle

from paddle_ema._select import short_repr

__all__ = ["Partition"]


@dataclasses.dataclass(frozen=True)
class Partition:
    """The sharding group and, by parameter name (``param.name``), the global rank that owns it.

    ``rank`` and ``world_size`` are this process's place in the group; ``kind`` names the sharding
    for messages and checkpoints.
    """

    kind: str
    group: Any
    rank: int
    world_size: int
    owners: dict[str, int]

    @classmethod
    def of(cls, optimizer: Any) -> Partition:
        """The partition of sharded ``optimizer`` (what ``fleet.distributed_optimizer`` or
        ``group_sharded_parallel`` returned).

        Raises:
            TypeError: ``optimizer`` is not one of the sharded optimizers above.
            ValueError: it shards parameters themselves (see the module docstring).
        """
        inner = optimizer
        while type(inner).__name__ not in _KNOWN and getattr(inner, "_inner_opt", None) is not None:
            inner = inner._inner_opt
        kind = type(inner).__name__
        fused = getattr(inner, "tensor_fusion", False) or getattr(inner, "_split_param", False)
        if kind in _SPLITTING or fused:
            raise ValueError(
                f"sharding={type(optimizer).__name__}: this optimizer splits parameters or fuses them "
                "into buffers, which ModelEMA's sharding does not follow yet; build the EMA without "
                "sharding= (each rank then keeps a full copy) or shard with stage 1/2 "
                "(sharding_degree with split_param=False and tensor_fusion=False, or "
                "group_sharded_parallel level 'os'/'os_g')"
            )
        if kind == "DygraphShardingOptimizer":
            group = inner._hcg.get_sharding_parallel_group()
            by_rank = inner._param2rank
            label = "fleet sharding stage 1"
        elif kind == "GroupShardedOptimizerStage2":
            group = inner._group
            by_rank = inner.param2rank
            label = "group_sharded_parallel stage 1/2"
        else:
            raise TypeError(
                f"sharding must be the optimizer fleet.distributed_optimizer returned under a "
                f"sharding_degree > 1, or the one group_sharded_parallel returned; got "
                f"{short_repr(optimizer)} of type {type(optimizer).__name__}"
            )
        ranks = list(group.ranks)
        return cls(label, group, int(group.rank), int(group.nranks),
                   {name: ranks[r] for name, r in by_rank.items()})

    @property
    def global_rank(self) -> int:
        return paddle.distributed.get_rank()

    def owner(self, tensor: Any) -> int | None:
        """The global rank whose optimizer updates ``tensor``; None if it is not partitioned."""
        return self.owners.get(getattr(tensor, "name", None))

    def broadcast(self, owners: dict[str, int], values: dict[str, Any],
                  specs: dict[str, tuple[Sequence[int], Any]]) -> dict[str, Any]:
        """Every rank's copy of ``values[name]``, held by rank ``owners[name]``, for every name of
        ``owners``: one broadcast per name, in ``owners``' order (the same on every rank). Other
        ranks receive into new tensors of ``specs[name]``'s shape and dtype. Every rank of the group
        must call it."""
        me = self.global_rank
        out = {}
        for name, owner in owners.items():
            if owner == me:
                tensor = values[name]
            else:
                shape, dtype = specs[name]
                tensor = paddle.empty(shape, dtype=dtype)
            paddle.distributed.broadcast(tensor, src=owner, group=self.group)
            out[name] = tensor
        return out


_KNOWN = ("DygraphShardingOptimizer", "DygraphShardingOptimizerV2", "GroupShardedOptimizerStage2")
_SPLITTING = ("DygraphShardingOptimizerV2", "GroupShardedOptimizerStage3")
