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
import math
import zlib
from typing import Any, Sequence

import paddle

from paddle_ema import _ir
from paddle_ema._select import short_repr

__all__ = ["Partition", "layout_code"]


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
        """The global rank whose optimizer updates ``tensor``; None if no rank's does alone.

        A tensor that does not train (a buffer, a frozen parameter, batch-norm statistics, which
        Paddle makes parameters) is in the optimizer's partition when the optimizer was given
        ``model.parameters()``, but its owner neither updates it nor always broadcasts it: every
        rank's model holds its own (Paddle 3.x's stage 1 broadcasts only what has a gradient, stage
        2 never), so every rank averages its own.
        """
        if getattr(tensor, "stop_gradient", True):
            return None
        return self.owners.get(getattr(tensor, "name", None))

    def agree(self, facts: Sequence[float], failure: BaseException | None,
              step: str = "before gathering the EMA's averages") -> list[list[float]]:
        """Every rank's ``facts`` (numbers exact in float64), once every rank of the group got here,
        in group rank order. A rank that failed before a collective (``failure``) still calls this,
        so that no other rank waits on it until the group times out; the others' error says it
        failed ``step``.

        Raises:
            ``failure``, on the rank it happened on; a RuntimeError on the others, naming that rank.
        """
        row = [0.0 if failure is not None else 1.0, *map(float, facts)]
        mine = paddle.to_tensor(row, dtype="float64")
        rows: list[Any] = []
        paddle.distributed.all_gather(rows, mine, group=self.group)
        table = [[float(v) for v in r.numpy()] for r in rows]
        if failure is not None:
            raise failure
        failed = [self.group.ranks[i] for i, r in enumerate(table) if r[0] != 1.0]
        if failed:
            raise RuntimeError(
                f"rank {', '.join(map(str, failed))} of the sharding group failed {step} (its own "
                "error says why); nothing was gathered or changed here"
            )
        return [r[1:] for r in table]

    def gather(self, owners: dict[str, int], values: dict[str, Any],
               specs: dict[str, tuple[Sequence[int], str]]) -> dict[str, Any]:
        """Every rank's copy of ``values[name]``, held by rank ``owners[name]``, for every name of
        ``owners``; other ranks receive into tensors of ``specs[name]``'s shape and dtype name.

        One broadcast per (owner, dtype) of one flat buffer, which the owner fills with one concat
        and the others cut into pieces (views on Paddle 3.x): a gloo broadcast costs ~0.2 ms
        whatever its size up to megabytes, so one per tensor would cost more than the data. Every
        rank of the group calls it with the same ``owners`` and ``specs`` (in the same order).
        """
        me = self.global_rank
        batches: dict[tuple[int, str], list[str]] = {}
        for name, owner in owners.items():
            batches.setdefault((owner, specs[name][1]), []).append(name)
        out: dict[str, Any] = {}
        for (owner, dtype), names in batches.items():
            sized = [n for n in names if math.prod(specs[n][0])]
            for name in names:
                if name not in sized:  # (Paddle 2.6 cannot concat or broadcast an empty tensor)
                    out[name] = values[name] if owner == me else paddle.zeros(specs[name][0], dtype)
            if not sized:
                continue
            shapes = [list(specs[n][0]) for n in sized]
            if owner == me:
                flat = paddle.concat([values[n].reshape([-1]) for n in sized])
            else:
                flat = paddle.empty([sum(math.prod(s) for s in shapes)], dtype=dtype)
            paddle.distributed.broadcast(flat, src=owner, group=self.group)
            if owner == me:
                out.update((n, values[n]) for n in sized)
            else:
                out.update(zip(sized, _ir.eager_pieces(flat, shapes)))
        return out


def layout_code(owners: dict[str, int], specs: dict[str, tuple[Sequence[int], str]]) -> int:
    """A checksum (exact in float64) of who owns what, of which shape and dtype: ranks whose codes
    differ hold different models or partitions, and a gather between them would mix garbage."""
    text = ";".join(f"{n}@{owners[n]}:{list(specs[n][0])}:{specs[n][1]}" for n in owners)
    return zlib.crc32(text.encode())


_KNOWN = ("DygraphShardingOptimizer", "DygraphShardingOptimizerV2", "GroupShardedOptimizerStage2")
_SPLITTING = ("DygraphShardingOptimizerV2", "GroupShardedOptimizerStage3")
