"""The thin adapter between paddle_ema and Paddle's two static IRs.

This is the only module that asks which IR is active (PIR, the default on Paddle 3.x, or the legacy
ProgramDesc IR that Paddle 2.6 uses and 3.x keeps behind ``FLAGS_enable_pir_api=0``) and the only one
that touches private Paddle APIs. Each such use says why.

Everything else in paddle_ema is written once, against what both IRs share: ``paddle.assign(x,
output=y)``, ``paddle.increment``, ``paddle.where``, ``paddle.cast``, ``paddle.concat``,
slicing and the arithmetic operators. The in-place update ops are spelled here, per IR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import operator
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import paddle
from paddle.base.data_feeder import convert_dtype

__all__ = [
    "as_numpy_dtype",
    "bind_persistable",
    "concat_into_buffer",
    "create_state",
    "declare_output",
    "detached_tensor",
    "dist_unsupported",
    "dtype_name",
    "eager_coalesce",
    "eager_copy",
    "eager_decay_",
    "eager_flat_view",
    "eager_let_go",
    "eager_gather_lerp_",
    "eager_holder",
    "eager_pieces",
    "eager_rows",
    "eager_set_aside",
    "eager_swap_in",
    "eager_views_hold",
    "fill_scope_tensor",
    "find_scope_tensor",
    "find_scope_variable",
    "holds_memory",
    "host_copy",
    "in_pir_mode",
    "initialized_place",
    "is_dist",
    "is_dist_probe",
    "is_empty",
    "is_graph_variable",
    "is_placed_like",
    "last_writer",
    "LayerBindings",
    "lerp_",
    "made_whole",
    "moved_to",
    "op_count",
    "parameters_written",
    "persistable_name",
    "persistable_names",
    "persistable_specs",
    "placed_like",
    "program_of",
    "program_parameters",
    "read_array",
    "read_scalar",
    "release",
    "rows_of",
    "same_place",
    "scale_into",
    "schedule_role",
    "scope_tensor",
    "sgd_lerp_",
    "share_memory",
    "tensor_spec",
    "update_role",
    "variable_tensor",
]


def in_pir_mode() -> bool:
    """Whether static programs are built in PIR (True) or in the legacy IR (False)."""
    return bool(paddle.framework.in_pir_mode())


def is_graph_variable(value: Any) -> bool:
    """Whether ``value`` is a static-graph tensor of the active IR (a PIR Value or a legacy Variable)."""
    if in_pir_mode():
        return isinstance(value, paddle.pir.Value)
    return isinstance(value, paddle.static.Variable)


def dtype_name(value: Any) -> str:
    """The dtype of ``value`` as a numpy-style name ('float32', 'bfloat16', ...).

    The one place paddle_ema names a dtype. ``value`` is a graph variable of either IR, a scope
    tensor, an eager ``paddle.Tensor`` or a numpy array (one Paddle gave: a bfloat16 tensor comes
    as its uint16 bit patterns, and is named bfloat16).
    """
    # A scope tensor tells its dtype by a method; the others by an attribute.
    dtype = value._dtype() if hasattr(value, "_dtype") else value.dtype
    # (by type too: two enums' members, VarType's and DataType's, may compare equal as numbers)
    key = (type(dtype), dtype)
    try:
        return _DTYPE_NAMES[key]  # (convert_dtype costs ~3 us a call)
    except (KeyError, TypeError):
        pass
    name = convert_dtype(dtype)
    # convert_dtype names bfloat16 'uint16' (numpy has no bfloat16 and holds its bits as uint16).
    name = "bfloat16" if name == "uint16" else name
    try:
        _DTYPE_NAMES[key] = name
    except TypeError:  # (a dtype object that cannot be a key)
        pass
    return name


_DTYPE_NAMES: dict[tuple[type, Any], str] = {}


def create_state(name: str, shape: Sequence[int], dtype: str, fill: float) -> Any:
    """Create persistable, non-trainable state in the current main program.

    The state is initialised to ``fill`` by the current startup program and is visible in the current
    main program under ``name``.

    Args:
        name: Unique variable name.
        shape: Static shape.
        dtype: Numpy-style dtype name.
        fill: Initial value of every element.

    Returns:
        The handle (Value or Variable) to use in the current main program.
    """
    if in_pir_mode():
        # PIR has no create_global_var (it dies on a VarType dtype in Paddle 3.3); this is the helper PIR's
        # own optimizers use for their accumulators: a startup op that fills the value and marks it
        # persistable, plus a persistable `data` op at the top of the main program that binds to it.
        from paddle.pir.core import create_persistable_value

        state = create_persistable_value(
            dtype, list(shape), name=name, initializer=paddle.nn.initializer.Constant(fill)
        )
    else:
        state = paddle.static.create_global_var(
            shape=list(shape), value=fill, dtype=dtype, persistable=True, name=name
        )
    state.stop_gradient = True
    return state


def bind_persistable(name: str, shape: Sequence[int], dtype: str) -> Any:
    """Refer, from the current (new) program, to a persistable tensor that already lives in the scope.

    Used by the apply and restore programs, which read and write the parameters and the EMA state that
    the training program owns.
    """
    if in_pir_mode():
        # A persistable `data` op is how PIR itself refers to scope tensors across programs (see
        # paddle.pir.core._get_persistable_value); a non-persistable one would be taken for a feed.
        handle = paddle.static.data(name, list(shape), dtype)
        handle.persistable = True
    else:
        handle = paddle.static.default_main_program().global_block().create_var(
            name=name, shape=list(shape), dtype=dtype, persistable=True
        )
    handle.stop_gradient = True
    return handle


def sgd_lerp_(average: Any, target: Any, weight: Any, weight_neg: Any) -> None:
    """In place: ``average += weight * (target - average)`` as two ``sgd_`` kernels, no temporary.

    ``sgd_`` computes ``param -= lr * grad``: first with ``grad = average`` and ``lr = weight``
    (``average -= weight * average``), then with ``grad = target`` and ``lr = weight_neg = -weight``
    (``average += weight * target``). Only the weight enters: a ``decay * average`` form would use a
    float32 ``decay`` whose sum with the weight misses 1 by up to half an ulp, a systematic error of
    about ``3e-8 / weight`` relative (3e-3 at decay 0.99999). Both kernels are flat and vectorised and
    run at memory speed, where ``lerp`` (see :func:`lerp_`) broadcasts its weight through Eigen and is
    3-10x slower on tensors of more than a few thousand elements (worst on 4-d conv weights). Both are
    elementwise, so binding ``grad`` and the output to ``param`` is safe. On eager (dygraph) tensors
    the kernels run at once; there they beat ``lerp_`` at every size measured (64 to 262k elements).
    """
    if paddle.in_dynamic_mode():
        paddle._C_ops.sgd_(average, weight, average, None, False)
        paddle._C_ops.sgd_(average, weight_neg, target, None, False)
        return
    if in_pir_mode():
        shrunk = paddle._C_ops.sgd_(average, weight, average, None, False)[0]
        paddle._C_ops.sgd_(shrunk, weight_neg, target, None, False)
        return
    for lr, grad in ((weight, average), (weight_neg, target)):
        average.block.append_op(
            type="sgd",
            inputs={"Param": [average], "LearningRate": [lr], "Grad": [grad]},
            outputs={"ParamOut": [average]},
            attrs={"multi_precision": False},
        )


def concat_into_buffer(members: Sequence[Any], name: str) -> Any:
    """``paddle.concat(members, axis=0)`` into scope tensor ``name``, which keeps its memory between runs.

    A temporary of several MB would be freed after every step and faulted back in at the next (Paddle's
    CPU allocator returns large blocks to the OS: 1025 minor faults and 1.5-1.9 ms a step for a 4 MB
    stack, see benchmarks/upstream/). A persistable output keeps its allocation, which the concat
    kernel reuses. ``paddle.static.save`` checkpoints never carry it (it is overwritten before every
    read): under PIR, ``paddle.static.save`` keeps parameters and persistable ``data`` values, and this
    is neither; in the legacy IR it is flagged like a feed target (``need_check_feed``), which
    ``paddle.static.save``, ``paddle.static.load`` and ``Program.state_dict`` skip, as
    :func:`persistable_names` does. Paddle's older ``save_persistables`` family saves it (the
    executor keeps only persistable variables allocated, and those functions take them all);
    docs/checkpoints.md says how to load such a checkpoint written before it existed.
    """
    if in_pir_mode():
        stacked = paddle.concat(list(members), axis=0)
        stacked.persistable = True
        paddle._pir_ops.set_persistable_value(stacked, name)
        return stacked
    # Made by the startup program like any persistable (paddle.static.set_program_state asserts that
    # every persistable of the program exists in the scope before it loads a checkpoint).
    shape = [sum(int(m.shape[0]) for m in members), *members[0].shape[1:]]
    stacked = create_state(name, shape, dtype_name(members[0]), 0.0)
    stacked.desc.set_need_check_feed(True)
    members[0].block.append_op(
        type="concat", inputs={"X": list(members)}, outputs={"Out": [stacked]}, attrs={"axis": 0}
    )
    return stacked


def lerp_(average: Any, target: Any, weight: Any) -> None:
    """In place: ``average += weight * (target - average)``, one kernel, no temporary.

    ``paddle.lerp_`` is dygraph-only, so the in-place op is emitted the way each IR spells it: PIR's
    ``_C_ops.lerp_`` (what ``paddle.lerp_`` itself calls), and in the legacy IR the ``lerp`` op with
    its output bound to its input, as ``paddle.increment`` does for its op. The kernel is elementwise,
    so the aliasing is safe, and it is the same kernel as ``paddle.lerp``: the numbers do not change.
    """
    if in_pir_mode():
        paddle._C_ops.lerp_(average, target, weight)
    else:
        average.block.append_op(
            type="lerp",
            inputs={"X": [average], "Y": [target], "Weight": [weight]},
            outputs={"Out": [average]},
        )


def scale_into(x: Any, factor: Any, name: str, dtype: str) -> None:
    """Write ``x * factor`` (``factor``: a one-element tensor), cast to ``dtype``, into scope tensor
    ``name``: one pass.

    The legacy IR lets an op write any variable: one ``scale`` op with ``Out`` bound to a persistable
    variable of that name. PIR ops write only new values or, in place, their own inputs, so the product
    is a new value that ``set_persistable_value`` (a ``shadow_output``) hands to the scope under
    ``name``, with no copy.
    """
    if in_pir_mode():
        product = paddle.scale(x, factor)
        if dtype_name(product) != dtype:
            product = paddle.cast(product, dtype)
        product.persistable = True
        paddle._pir_ops.set_persistable_value(product, name)
        return
    block = x.block
    out = block.create_var(name=name, shape=x.shape, dtype=dtype, persistable=True)
    if dtype_name(x) != dtype:  # a float32 average of a low-precision parameter: round once
        paddle.assign(paddle.cast(paddle.scale(x, factor), dtype), output=out)
        return
    block.append_op(
        type="scale",
        inputs={"X": [x], "ScaleTensor": [factor]},
        outputs={"Out": [out]},
        attrs={"scale": 1.0, "bias": 0.0, "bias_after_scale": True},
    )


@contextlib.contextmanager
def update_role(program: Any) -> Iterator[None]:
    """Mark the ops emitted inside as optimizer ops of ``program``.

    In the legacy IR, ``program.clone(for_test=True)`` drops ops carrying the optimize role, so a test
    program cloned after ``update()`` never updates the averages. PIR's ``clone()`` has no ``for_test``;
    there a test program is cloned before ``minimize`` (or pruned), so no marking is needed.
    """
    if in_pir_mode():
        yield
        return
    # Private but stable since Paddle 1.x: the same guard the legacy optimizers use.
    with program._optimized_guard([]):
        yield


@contextlib.contextmanager
def schedule_role(program: Any) -> Iterator[None]:
    """Mark the ops emitted inside as learning-rate-schedule ops of ``program``, as Paddle's own step
    counters are.

    Like :func:`update_role`, a legacy ``clone(for_test=True)`` drops them, but unlike optimizer ops
    they may come before the backward pass: fleet's sharding optimizer asserts that no optimizer op
    does (``AssertionError`` in ``ShardingOptimizer._split_program``). A no-op under PIR.
    """
    if in_pir_mode():
        yield
        return
    with program._lr_schedule_guard():
        yield


def _typed_place(place: Any) -> Any:
    """Convert the generic ``Place`` a DenseTensor reports into the typed place ``DenseTensor.set`` needs."""
    if place.is_gpu_place():
        return paddle.CUDAPlace(place.gpu_device_id())
    if place.is_cuda_pinned_place():
        return paddle.CUDAPinnedPlace()
    if place.is_cpu_place():
        return paddle.CPUPlace()
    raise NotImplementedError(
        f"paddle_ema cannot place state on {place}; only CPU and CUDA places are supported"
    )


def _initialized_tensor(name: str, scope: Any) -> Any | None:
    """Tensor ``name`` of ``scope`` if it holds data, else None (missing or uninitialised)."""
    var = scope.find_var(name)
    if var is None or not var.get_tensor()._is_initialized():
        return None
    return var.get_tensor()


def initialized_place(name: str, scope: Any) -> Any | None:
    """The place of tensor ``name`` in ``scope``, or None if it is missing or uninitialised.

    Used to tell whether the startup program has already run (a parameter holds data) and, if so,
    where the state that paddle_ema adds must live so that it sits beside that parameter.
    """
    tensor = _initialized_tensor(name, scope)
    return None if tensor is None else _typed_place(tensor._place())


def as_numpy_dtype(value: np.ndarray) -> np.ndarray:
    """An array Paddle gave numpy, in a numpy dtype: bfloat16, which numpy holds as its uint16 bit
    patterns, becomes float32 (exactly)."""
    return (value.astype(np.uint32) << 16).view(np.float32) if dtype_name(value) == "bfloat16" else value


def read_array(name: str, scope: Any) -> np.ndarray:
    """A copy of tensor ``name`` of ``scope`` as a numpy array; bfloat16 as float32."""
    return as_numpy_dtype(np.array(scope.find_var(name).get_tensor()))


def read_scalar(name: str, scope: Any) -> float | None:
    """The value of one-element tensor ``name`` in ``scope``, or None if it holds no data."""
    tensor = _initialized_tensor(name, scope)
    return None if tensor is None else float(np.array(tensor).reshape(-1)[0])


def scope_tensor(name: str, scope: Any) -> Any:
    """A handle to tensor ``name`` of ``scope``, declared (holding no memory) if it is not there.

    A program allocates a declared tensor on its executor's place when it first writes it. PIR needs
    the variable and its tensor holder to exist beforehand (a write to a name the scope lacks is
    silently lost). The handle stays valid as long as the scope lives.
    """
    return scope.var(name).get_tensor()


def detached_tensor() -> Any:
    """A new tensor of no scope, holding no memory, owned by its Python handle (a scope's tensors
    are freed with the scope, whatever handles Python keeps to them)."""
    from paddle.base import core

    return (getattr(core, "DenseTensor", None) or core.LoDTensor)()  # (2.6 names it LoDTensor)


def find_scope_variable(name: str, scope: Any) -> Any | None:
    """Variable ``name`` as ``scope`` resolves it (its own or an ancestor's), or None."""
    return scope.find_var(name)


def find_scope_tensor(name: str, scope: Any) -> Any | None:
    """A handle to tensor ``name`` of ``scope``, or None if the scope has no such variable."""
    return variable_tensor(scope.find_var(name))


def variable_tensor(variable: Any | None) -> Any | None:
    """A handle to the tensor scope variable ``variable`` holds (None for None)."""
    return None if variable is None else variable.get_tensor()


def declare_output(name: str, scope: Any) -> None:
    """Declare, holding no memory, the scope variable a program's op will write as ``name``.

    The legacy IR needs it: ``paddle.static.set_program_state`` asserts that every persistable of a
    program is in the scope, and one made after the startup program ran is not. Under PIR the op's
    ``shadow_output`` puts its own variable there (and such variables are not checkpointed).
    """
    if not in_pir_mode():
        scope.var(name)


def share_memory(tensor: Any, source: Any) -> None:
    """Make scope tensor ``tensor`` refer to the memory of scope tensor ``source`` (no copy).

    Private but present from Paddle 2.6 to 3.3: ``DenseTensor._share_data_with``, which points a
    tensor at another's allocation. Executors look tensors up by variable each run, so programs see
    the new memory from their next run on, in both IRs.
    """
    tensor._share_data_with(source)


def rows_of(tensor: Any, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` along axis 0 of scope tensor ``tensor``: a view of its memory, no copy.

    ``DenseTensor._slice`` (present from Paddle 2.6 to 3.3) shares the allocation at an offset, and
    keeps it alive after ``tensor`` lets go (see :func:`release`).
    """
    return tensor._slice(start, stop)


def holds_memory(tensor: Any) -> bool:
    """Whether scope tensor ``tensor`` holds memory."""
    return tensor._is_initialized()


def tensor_spec(tensor: Any) -> tuple[tuple[int, ...], str]:
    """The shape and dtype name ('float32', 'bfloat16', ...) of scope tensor ``tensor``."""
    return tuple(int(d) for d in tensor.shape()), dtype_name(tensor)


def release(tensor: Any) -> None:
    """Let scope tensor ``tensor`` go of its memory (freed if nothing else refers to it)."""
    tensor._clear()


def eager_holder() -> Any:
    """A new eager tensor object holding no data, made without running a kernel.

    ``paddle.Tensor()`` runs an ``empty`` kernel on Paddle 3.x (one per tensor an apply sets aside);
    the typed constructor of ``core.eager.Tensor`` (dtype, dims, name, var type, persistable) does
    not. What it holds is replaced before it is read (see :func:`eager_coalesce`).
    """
    from paddle.base import core

    var_type = core.VarDesc.VarType
    holder = core.eager.Tensor(var_type.FP32, [1], "paddle_ema_holder", var_type.LOD_TENSOR, False)
    holder.stop_gradient = True
    return holder


def eager_set_aside(tensor: Any) -> Any:
    """A new eager tensor holding ``tensor``'s data (no copy, no kernel), for :func:`eager_swap_in`:
    ``tensor`` can then be pointed elsewhere and back."""
    return tensor.detach()


def eager_pieces(flat: Any, shapes: Sequence[Sequence[int]]) -> list[Any]:
    """New eager tensors holding consecutive pieces of 1-d eager tensor ``flat``, shaped ``shapes``.

    One ``split`` kernel (on Paddle 3.x a stride kernel: the pieces are views of ``flat``; on 2.6,
    copies), then each piece's dims set in place with ``DenseTensor._set_dims`` (private, present
    from Paddle 2.6 to 3.3), where a ``reshape`` per piece would cost a call through the op
    dispatcher each.
    """
    pieces = paddle._C_ops.split(flat, [math.prod(shape) for shape in shapes], 0)
    for piece, shape in zip(pieces, shapes):
        piece.get_tensor()._set_dims(list(shape))
    return pieces


def eager_rows(flat: Any, start: int, stop: int) -> Any:
    """A new eager tensor viewing rows ``start:stop`` of 1-d eager tensor ``flat``, with no kernel
    (``DenseTensor._slice`` and ``_share_data_with``, private, present from Paddle 2.6 to 3.3)."""
    view = eager_holder()
    view.get_tensor()._share_data_with(flat.get_tensor()._slice(start, stop))
    return view


def eager_flat_view(tensor: Any, view: Any = None) -> Any:
    """A 1-d eager tensor sharing eager ``tensor``'s data (all its elements), with no kernel: ``view``
    (an eager tensor made here earlier) pointed there, or a new one."""
    view = eager_holder() if view is None else view
    view.get_tensor()._share_data_with(tensor.get_tensor())
    view.get_tensor()._set_dims([math.prod(tensor.shape)])
    return view


def eager_let_go(tensor: Any) -> None:
    """Eager ``tensor`` holds no memory from now on (the object stays, to be pointed again)."""
    tensor._clear_data()


def eager_views_hold(views: Sequence[Any], tensors: Sequence[Any]) -> list[int]:
    """The positions where ``views[i]`` (from :func:`eager_flat_view`) no longer shares
    ``tensors[i]``'s data: the tensor was given new memory (a load that re-allocates, a cast)."""
    shares = type(views[0])._is_shared_buffer_with  # (the unbound method: ~0.07 us a pair)
    if all(map(shares, views, tensors)):
        return []
    return [i for i, (view, tensor) in enumerate(zip(views, tensors)) if not shares(view, tensor)]


def eager_gather_lerp_(rows: Any, views: Sequence[Any], weight_neg: Any, move: bool = False) -> None:
    """``rows += weight * concat(views)`` in place, after ``rows -= weight * rows`` (the second
    ``sgd_`` of :func:`sgd_lerp_`): one ``concat`` into a new block (keep ``rows`` under 2 MiB: see
    :class:`paddle_ema._flat.Policy`) and one ``sgd_``; with ``move``, the block is copied to
    ``rows``' place first (``views`` live on another device)."""
    block = paddle._C_ops.concat(list(views), 0)
    paddle._C_ops.sgd_(rows, weight_neg, moved_to(block, rows.place) if move else block, None, False)


def is_empty(tensor: Any) -> bool:
    """Whether eager ``tensor`` has no values (a 0 in its shape): ``Tensor.size`` costs ~5-7 us a
    call (3.3 builds a ``TensorSize`` object), this ~0.2."""
    return 0 in tensor.shape


def eager_copy(tensor: Any) -> Any:
    """A copy of eager ``tensor`` on its device; an empty tensor as it is (it holds no value that
    could change, and Paddle 2.6 copies none: "We can only support initialized tensor in clone")."""
    return tensor if is_empty(tensor) else tensor.clone()


def host_copy(tensor: Any) -> Any:
    """A copy of eager ``tensor`` in host memory (``Tensor.cpu()`` of a host tensor would share its
    memory); an empty tensor as it is (see :func:`eager_copy`)."""
    if is_empty(tensor) or tensor.place.is_cpu_place():
        return eager_copy(tensor)
    return tensor.cpu()


def same_place(a: Any, b: Any) -> bool:
    """Whether eager tensors ``a`` and ``b`` are on the same device."""
    return a.place._equals(b.place)


def moved_to(tensor: Any, place: Any) -> Any:
    """Eager ``tensor`` on ``place``: itself if it is there or empty (no memory to move; Paddle 2.6
    copies no uninitialized tensor), else a copy (the copy done on return)."""
    if is_empty(tensor) or tensor.place._equals(place):
        return tensor
    return tensor._copy_to(place, True)


def eager_decay_(flat: Any, weight: Any) -> None:
    """``flat -= weight * flat`` in place (the first ``sgd_`` of :func:`sgd_lerp_`)."""
    paddle._C_ops.sgd_(flat, weight, flat, None, False)


def eager_coalesce(sources: Sequence[Any], views: Sequence[Any], flat: Any, copy: bool) -> None:
    """Point each of eager tensors ``views`` at consecutive rows of eager tensor ``flat`` (1-d, of
    ``sources``' dtype), shaped as the matching ``sources`` tensor, copying the sources in if ``copy``.

    One kernel whatever the count (it costs ~1.6 us a tensor in the legacy op machinery, so it
    builds a group and does not run per update): the legacy ``coalesce_tensor`` operator (present
    from Paddle 2.6 to 3.3, which Paddle's fused optimizers use to put parameters in one buffer)
    takes its outputs and fused buffer as arguments and re-points them. Its CPU kernels exist for
    float32 and float64 only. ``views`` must not share data with any other tensor: their
    DenseTensors are re-pointed in place.
    """
    from paddle.base import core

    var_type = {"float32": core.VarDesc.VarType.FP32, "float64": core.VarDesc.VarType.FP64}
    paddle._legacy_C_ops.coalesce_tensor(
        list(sources), list(views), flat, "copy_data", copy, "use_align", False,
        "dtype", int(var_type[dtype_name(sources[0])]),
    )


def is_dist(tensor: Any) -> bool:
    """Whether eager ``tensor`` is an auto-parallel ``DistTensor`` (``paddle.distributed.shard_tensor``):
    its data is this rank's local piece, which the DenseTensor-level helpers here cannot take."""
    return bool(getattr(tensor, "is_dist", None) and tensor.is_dist())


def is_dist_probe(tensor: Any) -> Callable[[], bool]:
    """A call telling whether eager ``tensor`` is a DistTensor now (Paddle's ``shard_optimizer``
    makes a parameter one in place): its bound ``is_dist``, about a third of the cost of
    :func:`is_dist` per call, for checks made every update."""
    method = getattr(tensor, "is_dist", None)
    return method if method is not None else _not_dist


def _not_dist() -> bool:
    return False


def dist_unsupported(name: str, tensor: Any) -> str | None:
    """Why ``tensor`` (the model's ``name``), an auto-parallel DistTensor, cannot be averaged on this
    Paddle, or None (also for any other tensor): Paddle 2.6's ``clone`` of a sharded DistTensor
    comes back ``Replicate()`` (a copy of another shape: an average could not be saved nor set aside)."""
    if is_dist(tensor) and paddle.__version__.startswith("2."):
        return (f"the model's {name!r} is an auto-parallel DistTensor (paddle.distributed.shard_tensor), "
                "which ModelEMA averages on Paddle 3.0 and later: Paddle 2.6's DistTensor.clone() "
                "drops the placements (a Shard(1) tensor comes back Replicate()); upgrade Paddle, or "
                "average the model before sharding it")
    return None


def is_placed_like(value: Any, tensor: Any) -> bool:
    """Whether ``value`` is placed as ``tensor``: both dense, or both DistTensors on one process
    mesh with the same placements."""
    if not is_dist(tensor) or not is_dist(value):
        return is_dist(tensor) == is_dist(value)
    return value.process_mesh == tensor.process_mesh and value.placements == tensor.placements


def placed_like(value: Any, tensor: Any) -> Any:
    """``value`` (the whole value on every rank, or a DistTensor) placed as ``tensor``: ``value``
    itself if it is already (a dense ``tensor`` takes any ``value`` as it is), else a DistTensor on
    ``tensor``'s process mesh with its placements."""
    if not is_dist(tensor) or is_placed_like(value, tensor):
        return value
    if not is_dist(value):
        return paddle.distributed.shard_tensor(value, tensor.process_mesh, tensor.placements)
    return paddle.distributed.reshard(value, tensor.process_mesh, tensor.placements)


def made_whole(value: Any) -> Any:
    """DistTensor ``value``'s whole value, a dense tensor on every rank (collective over its mesh:
    every rank of it calls this)."""
    replicated = [paddle.distributed.Replicate()] * len(value.placements)
    return paddle.distributed.reshard(value, value.process_mesh, replicated)._local_value()


def eager_swap_in(tensor: Any, source: Any) -> None:
    """Point eager ``tensor`` (a parameter: the object, its name and its autograd state stay) at
    ``source``'s data, with no copy."""
    source._share_underline_tensor_to(tensor)


def _get(mapping: Any, key: str) -> Any:
    return mapping.get(key)


_DTYPE_KEYS = itertools.repeat("_dtype")


@dataclasses.dataclass(frozen=True)
class LayerBindings:
    """Where a layer and its sublayers hold their tensors and sublayers, as taken by :meth:`of`.

    ``entries`` are ``(dict, key, object, kind, name)`` for every entry of each sublayer's
    ``_parameters``, ``_buffers`` and ``_sub_layers`` (kind ``"parameter"``, ``"buffer"`` or
    ``"sublayer"``; ``name`` the structured name); ``dicts`` each of those dicts with its keys and its
    sublayer's name prefix; ``dtypes`` each sublayer with the object its ``_dtype`` attribute held,
    which ``Layer.to``, ``float``, ``half`` and AMP decoration re-bind when they cast the tensors in
    place. Telling that nothing was re-bound, added, removed or cast costs a lookup per entry
    (:meth:`hold`), where walking the names and reading every tensor's dtype costs about 10x more;
    :meth:`put_back` undoes all of it.

    Private but present from Paddle 2.6 to 3.3: ``Layer._parameters``, ``_buffers`` and
    ``_sub_layers``, the dicts ``Layer.__setattr__`` writes when a name is bound, and ``_dtype``.
    """

    entries: tuple[tuple[dict, str, Any, str, str], ...]
    dicts: tuple[tuple[dict, tuple[str, ...], str], ...]
    dtypes: tuple[tuple[Any, Any], ...]

    def __post_init__(self) -> None:
        # What hold() compares, in columns, so that it runs as a few C loops (map) rather than a
        # Python step per entry: it runs every update, over every entry. (Compare objects, not
        # their ids: ids of freed objects are reused.)
        columns = {
            "_dicts": tuple(owned for owned, _, _ in self.dicts),
            "_sizes": [len(keys) for _, keys, _ in self.dicts],
            "_entry_dicts": tuple(owned for owned, _, _, _, _ in self.entries),
            "_keys": tuple(key for _, key, _, _, _ in self.entries),
            "_objects": tuple(value for _, _, value, _, _ in self.entries),
            "_sublayers": tuple(sublayer for sublayer, _ in self.dtypes),
            "_dtype_objects": tuple(dtype for _, dtype in self.dtypes),
        }
        # (dict.get runs in C; Paddle's layers keep their entries in dicts, a mapping of another
        # kind is read through its own get)
        columns["_get"] = dict.get if all(isinstance(d, dict) for d in columns["_dicts"]) else _get
        for name, column in columns.items():
            object.__setattr__(self, name, column)

    @classmethod
    def of(cls, layer: Any) -> LayerBindings:
        entries, dicts, dtypes = [], [], []
        for prefix, sublayer in layer.named_sublayers(include_self=True):
            prefix = f"{prefix}." if prefix else ""
            dtypes.append((sublayer, vars(sublayer).get("_dtype")))
            for kind, owned in (("parameter", sublayer._parameters), ("buffer", sublayer._buffers),
                                ("sublayer", sublayer._sub_layers)):
                dicts.append((owned, tuple(owned), prefix))
                entries.extend((owned, key, value, kind, prefix + key) for key, value in owned.items())
        return cls(tuple(entries), tuple(dicts), tuple(dtypes))

    def hold(self) -> bool:
        """Whether the layer still holds the same objects under the same names, no more, and was
        not cast since."""
        return (
            list(map(len, self._dicts)) == self._sizes
            and all(map(operator.is_, map(self._get, self._entry_dicts, self._keys), self._objects))
            and all(map(operator.is_, map(dict.get, map(vars, self._sublayers), _DTYPE_KEYS),
                        self._dtype_objects))
        )

    def put_back(self) -> list[str]:
        """Make the layer hold what it held when these bindings were taken: every name bound to its
        object again, names added since removed, each sublayer's ``_dtype`` as it was. Idempotent.

        Returns:
            What was undone besides buffers bound anew (which a forward does, e.g. a counter),
            described for a log line.
        """
        if self.hold():
            return []
        undone = []
        for owned, key, value, kind, name in self.entries:
            if owned.get(key) is not value:
                owned[key] = value
                if kind != "buffer":
                    undone.append(f"{name} re-bound")
        for owned, keys, prefix in self.dicts:
            for key in [k for k in owned if k not in keys]:
                del owned[key]
                undone.append(f"{prefix}{key} added")
            if tuple(owned) != keys:  # a name removed and bound again went to the end: the order
                entries = [(key, owned[key]) for key in keys]  # decides named_parameters()'s
                owned.clear()
                owned.update(entries)
        for sublayer, dtype in self.dtypes:
            if vars(sublayer).get("_dtype") is not dtype:
                sublayer._dtype = dtype
                undone.append(f"{type(sublayer).__name__} cast")
        return undone


def fill_scope_tensor(
    name: str, shape: Sequence[int], dtype: str, fill: float, place: Any, scope: Any
) -> None:
    """Set tensor ``name`` in ``scope`` to ``fill`` on ``place``, creating it if needed.

    Paddle's executors offer no way to run only some ops of a startup program, and under PIR a write
    through a persistable ``data`` op to a name that the scope lacks is silently lost, so state that
    must exist before a program runs is put into the scope directly.
    """
    tensor = scope.var(name).get_tensor()
    tensor.set(np.full(list(shape), fill, dtype=dtype), place)


def persistable_names(program: Any) -> set[str]:
    """Names of every persistable variable of ``program``: what a checkpoint of it holds."""
    return {v.name for v in _persistables(program)}


def persistable_specs(program: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype name)}`` of every persistable tensor of ``program`` (see
    :func:`persistable_names`); variables of other types (readers, raw communicator ids) have
    neither and are left out."""
    specs = {}
    for v in _persistables(program):
        try:
            specs[v.name] = (tuple(int(d) for d in v.shape), dtype_name(v))
        except Exception:  # noqa: BLE001 - Paddle raises various errors for shapeless variable types
            continue
    return specs


def _persistables(program: Any) -> list[Any]:
    if in_pir_mode():
        # The helper paddle.static.load itself uses under PIR (parameters, then other persistables).
        from paddle.static.pir_io import get_pir_parameters

        params, others = get_pir_parameters(program)
        return [v for v in params + others if v.persistable]
    # need_check_feed: feed targets, and the stacking buffers (see concat_into_buffer), which
    # paddle.static.save skips too.
    return [v for v in program.list_vars() if v.persistable and not v.desc.need_check_feed()]


def program_parameters(program: Any) -> list[tuple[Any, bool]]:
    """Every parameter of ``program``, each with whether it is declared inside a control-flow block.

    The legacy IR declares every parameter in the global block. PIR declares a parameter where its
    layer is built: one built inside ``paddle.static.nn.cond`` or ``while_loop`` has its
    ``builtin.parameter`` op in that op's block, where ``Block.all_parameters()`` of the global block
    does not list it (nor does ``optimizer.minimize``: Paddle 3.x never trains such parameters).
    """
    found = [(p, False) for p in program.global_block().all_parameters()]
    if not in_pir_mode():
        return found

    def walk(block: Any) -> None:
        for op in block.ops:
            for inner in op.blocks():
                found.extend((o.result(0), True) for o in inner.ops if o.name() == "builtin.parameter")
                walk(inner)

    walk(program.global_block())
    return found


def op_count(program: Any) -> int:
    """How many ops ``program``'s global block holds (under PIR without building the op list)."""
    block = program.global_block()
    return block.num_ops() if in_pir_mode() else len(block.ops)


def last_writer(program: Any, state: Any) -> int:
    """The index, in ``program``'s global block, of the last op that writes ``state`` (a graph
    variable the program updates in place), or -1.

    Found by the variable, not remembered as a count: ops that later code inserts near the top of
    the block (PIR puts each new persistable's ``data`` op there) shift every index after them.
    """
    ops = program.global_block().ops
    for index in range(len(ops) - 1, -1, -1):
        op = ops[index]
        if in_pir_mode():
            if op.name().endswith("_") and op.num_operands() and op.operand_source(0).is_same(state):
                return index
        elif state.name in op.output_arg_names:
            return index
    return -1


def persistable_name(value: Any) -> str | None:
    """The scope name of graph variable ``value`` if it is persistable, else None."""
    if not getattr(value, "persistable", False):
        return None
    try:
        return value.name
    except Exception:  # noqa: BLE001 - a PIR Value of an op without a name raises its own error type
        return None


def program_of(value: Any) -> Any:
    """The program that graph variable ``value`` belongs to, in either IR."""
    if in_pir_mode():
        return value.get_defining_op().get_parent_block().program
    return value.block.program


def parameters_written(program: Any, start: int = 0) -> set[str]:
    """Names of the parameters of ``program`` that some op of its global block (from op ``start``
    on) writes.

    That is what an optimizer's ``minimize`` adds (one update op per trainable parameter), so it
    tells whether the optimizer ops are already in the program. Legacy ops name their outputs. PIR ops
    write scope tensors only in place: an in-place op (``sgd_``, ``adam_``, ...) whose first operand
    is the parameter, or ``assign_out_`` (``paddle.assign(x, output=param)``) with it as the second.
    ``batch_norm_`` takes the scale and bias as later operands and does not count.
    """
    block = program.global_block()
    ops = block.ops[start:]
    if not ops:
        return set()
    if not in_pir_mode():
        names = {p.name for p in block.all_parameters()}
        return {n for op in ops for n in op.output_arg_names if n in names}
    params = block.all_parameters()
    written = set()
    for op in ops:
        if not op.name().endswith("_"):
            continue
        operands = op.operands_source()
        target = 1 if op.name() == "pd_op.assign_out_" else 0
        if len(operands) <= target:
            continue
        written.update(p.name for p in params if operands[target].is_same(p))
    return written
