"""Which parameters a rank's ModelEMA averages under Paddle's dygraph sharding, and the broadcasts
that give every rank the averages the others own.

The EMA is elementwise, so under a sharded optimizer each rank averages only the parameters its
optimizer partition updates (and what is not partitioned: buffers, frozen parameters), with no
communication per update; the full averages are gathered only where a full model is needed
(``averages()``, ``apply()``, a consolidated state). A :class:`Partition` reads the partition from
the optimizer once:

* fleet hybrid parallel with ``sharding_degree`` (``DygraphShardingOptimizer``, stage 1, with or
  without ``tensor_fusion``): its ``_param2rank`` (parameter name to sharding rank) and the hybrid
  communicate group's sharding group (``_hcg.get_sharding_parallel_group()``), as its own parameter
  broadcast reads them;
* ``paddle.distributed.sharding.group_sharded_parallel`` at levels ``"os"`` and ``"os_g"``
  (``GroupShardedOptimizerStage2``): its ``param2rank`` and ``_group``.

Two layouts cut the parameters themselves into flat pieces, one per rank (:class:`Slices`): each
rank averages its pieces, with no communication per update, and the pieces are gathered (one
``all_gather`` per dtype) where a full model is needed.

* Stage 3 (``group_sharded_parallel`` level ``"p_g_os"``, ``GroupShardedStage3``, :class:`Stage3`):
  every parameter larger than the wrapper's ``segment_size`` is cut into equal flat slices, padded,
  one per rank (``param.fw_storage``, a new object after each step), and the parameter itself is
  freed outside forward; apply swaps each rank's averaged slices in. Parameters up to
  ``segment_size`` stay whole on every rank.
* Fleet's ``DygraphShardingOptimizerV2`` (``sharding_configs.split_param``, :class:`SplitParams`):
  the parameters are views of padded flat buffers, each rank's optimizer updates its share of each
  buffer, and the step all-gathers them; apply swaps the gathered whole averages in.

Under fleet's ``tensor_fusion`` (stage 1) the parameters are views of one fused buffer per owner,
and the owner broadcasts them as before: the partition is the same kind.

Private attributes, present from Paddle 2.6 to 3.3.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, ClassVar, Sequence

import numpy as np
import paddle

from paddle_ema import _ir
from paddle_ema._select import short_repr

__all__ = ["Layout", "Partition", "Slices", "SplitParams", "Stage3", "layout_code", "split_params",
           "stage3_wrapper"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """A sharding group: ``rank`` and ``world_size`` are this process's place in it; ``kind`` names
    the sharding for messages and checkpoints."""

    kind: str
    group: Any
    rank: int
    world_size: int

    @property
    def global_rank(self) -> int:
        return paddle.distributed.get_rank()

    def label(self) -> dict[str, Any]:
        """What a sharded state says of the shard it holds."""
        return {"kind": self.kind, "rank": self.rank, "world_size": self.world_size}

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


@dataclasses.dataclass(frozen=True)
class Partition(Layout):
    """Optimizer sharding (stages 1/2): by parameter name (``param.name``), the global rank whose
    optimizer updates it."""

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
        if kind in _SPLITTING:
            raise ValueError(
                f"sharding={type(optimizer).__name__}: this optimizer cuts the parameters themselves; "
                "ModelEMA reads its layout itself (see paddle_ema._sharding.SplitParams and Stage3)"
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
                flat = paddle.concat([_flat_view(values[n]) for n in sized])
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
_SPLITTING = ("DygraphShardingOptimizerV2", "GroupShardedOptimizerStage3")  # (see SplitParams, Stage3)


def stage3_wrapper(model: Any) -> Any | None:
    """The ``GroupShardedStage3`` that ``model`` is or wraps (looking through ``paddle.DataParallel``
    and fleet's wrappers), or None."""
    while model is not None:
        names = {cls.__name__ for cls in type(model).__mro__}
        if "GroupShardedStage3" in names:
            return model
        model = getattr(model, "_layers", None) if (
            isinstance(model, paddle.DataParallel) or "MetaParallelBase" in names) else None
    return None


@dataclasses.dataclass(frozen=True)
class Slices(Layout):
    """Parameters cut into flat pieces, one per rank, each padded flat parameter being the pieces of
    ranks 0, 1, ... end to end: by structured name, the parameters (``params``), this rank's
    ``(start, stop)`` in the padded flat parameter (``rows``) and every rank's piece size, in group
    rank order (``sizes``; a rank may hold none of a parameter)."""

    params: dict[str, Any]
    rows: dict[str, tuple[int, int]]
    sizes: dict[str, tuple[int, ...]]
    # (the gather indexes of whole(), by names, block length and place)
    _orders: dict[tuple[Any, ...], Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    # Whether apply swaps each rank's averaged pieces into the model (stage 3: its forward gathers
    # them), or the whole averages, gathered first (the parameters are whole between steps).
    swaps_pieces: ClassVar[bool] = False
    # Whether Paddle gives a piece new memory at each forward and frees the old (stage 3): an
    # update then holds no view of the pieces between updates, which would keep that memory.
    frees_pieces: ClassVar[bool] = False

    def local(self, names: Sequence[str], held: dict[str, Any]) -> dict[str, Any]:
        """This rank's pieces of parameters ``names``, as the model holds them now; ``held`` are
        those read last time, returned again where they still are the pieces."""
        raise NotImplementedError

    def put_back(self, pieces: dict[str, Any]) -> None:
        """Make ``pieces`` (this rank's, by name, which an apply set aside) the parameters' again,
        once their trained data is back in them."""

    def cut(self, name: str, whole: Any) -> Any:
        """This rank's piece of parameter ``name``'s whole value ``whole`` (any shape of its size),
        padded with zeros as Paddle pads it."""
        flat = _flat_view(whole)
        start, stop = self.rows[name]
        numel = int(flat.shape[0])
        if stop <= numel:
            return flat[start:stop].clone()
        padding = paddle.zeros([stop - max(start, numel)], dtype=flat.dtype)
        return paddle.concat([flat[start:numel], padding]) if start < numel else padding

    def whole(self, pieces: dict[str, Any]) -> dict[str, Any]:
        """The whole values of parameters from every rank's ``pieces`` (each rank its own, of the
        same names in the same order on every rank): one ``all_gather`` per dtype of the pieces
        concatenated (each rank's padded to the longest), then one ``gather`` that puts every
        parameter's values in order and one ``split`` (where a concat, a slice and a reshape per
        parameter cost ~0.1 ms a parameter in Python). Collective: every rank of the group calls
        it."""
        by_dtype: dict[str, list[str]] = {}
        for name, piece in pieces.items():
            by_dtype.setdefault(_ir.dtype_name(piece), []).append(name)
        out = {}
        for dtype, names in by_dtype.items():
            lengths = [sum(self.sizes[n][r] for n in names) for r in range(self.world_size)]
            longest = max(lengths)
            shapes = [list(self.params[n].shape) for n in names]
            if not longest:  # (nothing to send; Paddle 2.6 cannot gather an empty tensor)
                out.update((n, paddle.zeros(shape, dtype)) for n, shape in zip(names, shapes))
                continue
            parts = [_flat_view(pieces[n]) for n in names if self.sizes[n][self.rank]]
            if longest > lengths[self.rank]:
                parts.append(paddle.zeros([longest - lengths[self.rank]], dtype))
            flat = parts[0] if len(parts) == 1 else paddle.concat(parts)
            blocks: list[Any] = []
            paddle.distributed.all_gather(blocks, flat, group=self.group)
            order = paddle.gather(paddle.concat(blocks), self._order(tuple(names), longest, flat.place))
            out.update(zip(names, _ir.eager_pieces(order, shapes)))
        return out

    def _order(self, names: tuple[str, ...], longest: int, place: Any) -> Any:
        """Where each value of parameters ``names`` (in order, each flat, without its padding) is
        in the ranks' blocks end to end (``longest`` values a block, each rank's pieces of
        ``names`` in order): a cached int64 index on ``place``."""
        key = (names, longest, str(place))
        if key not in self._orders:
            starts = [[0] * len(names) for _ in range(self.world_size)]
            for rank in range(self.world_size):
                offset = rank * longest
                for i, name in enumerate(names):
                    starts[rank][i] = offset
                    offset += self.sizes[name][rank]
            index = []
            for i, name in enumerate(names):
                padded = np.concatenate([np.arange(starts[r][i], starts[r][i] + self.sizes[name][r])
                                         for r in range(self.world_size)])
                index.append(padded[:math.prod(self.params[name].shape)])
            self._orders[key] = paddle.to_tensor(np.concatenate(index).astype("int64"), place=place)
        return self._orders[key]


@dataclasses.dataclass(frozen=True)
class Stage3(Slices):
    """Stage 3 (``GroupShardedStage3``): the parameters cut into slices, each rank's being
    ``param.fw_storage`` (flat, padded, the same size on every rank)."""

    task_flow: Any = None  # (where a forward keeps the whole parameters it gathered)

    swaps_pieces: ClassVar[bool] = True
    frees_pieces: ClassVar[bool] = True

    @classmethod
    def of(cls, wrapper: Any, layer: Any) -> Stage3:
        """The slices of ``wrapper`` (what ``group_sharded_parallel(level="p_g_os")`` returned),
        whose inner Layer is ``layer``, as they are now (between steps: each sliced parameter has
        its ``fw_storage``)."""
        group = wrapper._group
        rank, world_size = int(group.rank), int(group.nranks)
        params = {n: p for n, p in layer.named_parameters() if getattr(p, "fw_storage", None) is not None}
        sizes = {n: (int(wrapper._param2buffer_size[p.name]) // world_size,) * world_size
                 for n, p in params.items()}
        rows = {n: tuple(map(int, wrapper._param2buffer[p.name][rank])) for n, p in params.items()}
        return cls("group_sharded_parallel stage 3", group, rank, world_size, params, rows, sizes,
                   task_flow=wrapper._task_flow)

    def local(self, names: Sequence[str], held: dict[str, Any]) -> dict[str, Any]:
        """The slices on this rank of the sliced parameters ``names``, as the model holds them now
        (a frozen one the EMA leaves out may be whole: stage 3 keeps those sliced only until the
        first backward).

        Raises:
            RuntimeError: a parameter holds no slice (it is gathered whole: called inside a
                forward, or after a forward that stopped half-way) or one of another size.
        """
        found = {}
        for name in names:
            param = self.params[name]
            piece = getattr(param, "fw_storage", None)
            if piece is None or list(piece.shape) != [self.sizes[name][self.rank]]:
                raise RuntimeError(
                    f"stage 3 holds {name!r} gathered whole, not as this rank's slice (inside a "
                    "forward, or after one that stopped half-way): call the EMA between training "
                    "steps, after optimizer.step()"
                )
            found[name] = piece
        return found

    def put_back(self, pieces: dict[str, Any]) -> None:
        """Make ``pieces`` (this rank's slices, by name) the parameters' slices again, as Paddle
        leaves a parameter between steps: a forward run meanwhile wraps each slice anew (restore
        writes into the object apply swapped), and one that stopped half-way left the parameter
        gathered whole (then it is freed again, as Paddle's release after a forward does). What a
        forward gathered meanwhile (whole averaged values, and prefetched ones, which a forward
        that finishes has released) is dropped: the next forward gathers the slices anew."""
        for name, piece in pieces.items():
            param = self.params[name]
            self.task_flow.full_param.pop(param.name, None)
            if param.fw_storage is piece:
                continue
            if param.fw_storage is None:  # (gathered whole by a forward that did not finish)
                param._clear_data()
                param.status = "part"
                param.use_count = 0
            param.fw_storage = piece


def split_params(optimizer: Any) -> Any | None:
    """The ``DygraphShardingOptimizerV2`` that ``optimizer`` is or wraps (fleet hybrid parallel with
    ``sharding_configs.split_param``), or None."""
    inner = optimizer
    while inner is not None:
        if type(inner).__name__ == "DygraphShardingOptimizerV2":
            return inner
        inner = getattr(inner, "_inner_opt", None)
    return None


@dataclasses.dataclass(frozen=True)
class SplitParams(Slices):
    """Fleet's ``DygraphShardingOptimizerV2`` (``split_param``): the trained parameters are views of
    flat buffers (``param_storage`` of each comm buffer, every parameter padded), each rank's
    optimizer updates its equal share of each buffer, and the step all-gathers the buffers, so the
    parameters are whole on every rank between steps. A rank's piece of a parameter is where the
    parameter's padded span in the buffer meets the rank's share: none, part or all of it.
    ``spans[name]`` is the comm buffer and this rank's ``(begin, end)`` in it."""

    spans: dict[str, tuple[Any, int, int]] = dataclasses.field(default_factory=dict)
    # (each buffer with the names of the nonempty pieces in it; the names of the empty ones)
    nonempty: tuple[tuple[Any, tuple[str, ...]], ...] = ()
    empty: frozenset[str] = frozenset()

    @classmethod
    def of(cls, optimizer: Any, layer: Any) -> SplitParams:
        """The pieces of ``layer``'s parameters that ``optimizer`` (a ``DygraphShardingOptimizerV2``)
        gives each rank.

        Raises:
            ValueError: the optimizer fills its buffers later (``pp_configs.sharding_comm_overlap``:
                pipeline parallel's), or holds none of ``layer``'s parameters.
        """
        if getattr(optimizer, "pp_overlap", False) or not optimizer._comm_buffer_list:
            raise ValueError(
                "sharding=: this DygraphShardingOptimizerV2 builds its buffers inside pipeline "
                "parallel (pp_configs.sharding_comm_overlap), which ModelEMA's sharding does not "
                "follow; build the EMA without sharding= (each rank then keeps a full copy)"
            )
        group = optimizer._hcg.get_sharding_parallel_group()
        # (a group of one outside a launched run says rank -1: Paddle 3.x's buffers read it as 0)
        rank, world_size = max(int(group.rank), 0), int(group.nranks)
        by_name = {p.name: n for n, p in layer.named_parameters()}
        params, rows, sizes, spans = {}, {}, {}, {}
        for buffer in optimizer._comm_buffer_list:
            share = int(buffer.param_storage.shape[0]) // world_size
            for param in buffer.params:
                name = by_name.get(param.name)
                if name is None:
                    continue
                view = buffer._sharding_param_grad_view[param.name]
                first, last = int(view._index), int(view._index) + int(view._padded_size)
                bounds = [(max(first, r * share), min(last, (r + 1) * share)) for r in range(world_size)]
                begin, end = bounds[rank]
                params[name] = param
                sizes[name] = tuple(max(0, stop - start) for start, stop in bounds)
                rows[name] = (begin - first, max(begin, end) - first)
                spans[name] = (buffer, begin, max(begin, end))
        if not params:
            raise ValueError(
                "sharding=: this DygraphShardingOptimizerV2 trains none of the model's parameters; "
                "pass the sharded optimizer that trains this model"
            )
        nonempty: dict[int, tuple[Any, list[str]]] = {}
        for name, (buffer, begin, end) in spans.items():
            if begin < end:
                nonempty.setdefault(id(buffer), (buffer, []))[1].append(name)
        return cls("fleet sharding split_param", group, rank, world_size, params, rows, sizes,
                   spans=spans, nonempty=tuple((b, tuple(n)) for b, n in nonempty.values()),
                   empty=frozenset(n for n, (_, begin, end) in spans.items() if begin == end))

    def local(self, names: Sequence[str], held: dict[str, Any]) -> dict[str, Any]:
        """Views of this rank's pieces of parameters ``names`` in their buffers (an empty tensor
        where the rank holds none); those of ``held`` that still view their buffer are kept.

        Raises:
            RuntimeError: a buffer holds no memory (released by ``clear_param_storage``).
        """
        kept = self._kept(held) if held else set()
        found = {}
        for name in names:
            if name in kept:
                found[name] = held[name]
                continue
            buffer, begin, end = self.spans[name]
            storage = buffer.param_storage
            before = held.get(name)
            if before is not None and _ir.eager_views_hold([before], [storage]) == []:
                found[name] = before
            elif not _ir.holds_memory(storage):
                raise RuntimeError(
                    f"the sharding optimizer has released the buffer that holds {name!r} "
                    "(clear_param_storage): call the EMA between training steps, after "
                    "optimizer.step()"
                )
            elif begin == end:
                found[name] = paddle.zeros([0], _ir.dtype_name(storage))
            else:
                found[name] = _ir.eager_rows(storage, begin, end)
                # (the name of the optimizer's slice of the parameter, which keys its master weight)
                found[name].name = self.params[name].name
        return found

    def _kept(self, held: dict[str, Any]) -> set[str]:
        """The names whose pieces in ``held`` still view their buffers, checked a buffer at a time
        (a check per name was most of an update's time); an empty piece views nothing and is
        kept."""
        kept = {name for name in self.empty if name in held}
        for buffer, names in self.nonempty:
            if not all(n in held for n in names):
                continue
            pieces = [held[n] for n in names]
            if not _ir.eager_views_hold(pieces, [buffer.param_storage] * len(pieces)):
                kept.update(names)
        return kept


def _flat_view(tensor: Any) -> Any:
    """``tensor`` as 1-d: itself if it is (a piece usually is; a reshape costs ~7 us in Python)."""
    return tensor if len(tensor.shape) == 1 else tensor.reshape([-1])
