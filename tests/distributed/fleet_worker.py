"""One rank of the same run as dp_worker.py, with the data-parallel step from fleet.

Legacy IR only (fleet fails under PIR on CPU). Stock fleet collective does not run on a CPU-only
build, so this applies a shim that lives in the tests only:
  * the gloo communicator for ring 0 is created first (dp_worker.init_comm),
  * CollectiveHelper._init_communicator is a no-op (it would try NCCL/XPU ids),
  * c_sync_comm_stream / c_sync_calc_stream ops are dropped (no CPU kernel).
strategy.without_graph_optimization = True selects the raw-program optimizer, which inserts one
all-reduce per gradient (the default graph pass exits 0 on CPU but never all-reduces).

    python -m paddle.distributed.launch --nproc_per_node=2 --log_dir LOG fleet_worker.py OUT
"""

from __future__ import annotations

import sys

import dp_worker as w
import paddle
import paddle.distributed.fleet as fleet
from paddle.distributed.fleet.meta_optimizers.common import CollectiveHelper

CollectiveHelper._init_communicator = lambda self, *args, **kwargs: None
NO_CPU_KERNEL = ("c_sync_comm_stream", "c_sync_calc_stream")
_FLEET_READY = []


def build(nranks: int, with_ema: bool, configure=lambda strategy: None):
    """dp_worker's network and EMAs under fleet's collective optimizer; ``configure(strategy)`` adds
    to the strategy."""
    assert not w.PIR, "fleet collective on CPU: legacy IR only"
    if not _FLEET_READY:
        fleet.init(is_collective=True)
        _FLEET_READY.append(True)
    main, startup = paddle.static.Program(), paddle.static.Program()
    with paddle.utils.unique_name.guard(), paddle.static.program_guard(main, startup):
        loss, step = w.network()
        strategy = fleet.DistributedStrategy()
        strategy.without_graph_optimization = True
        configure(strategy)
        opt = fleet.distributed_optimizer(
            paddle.optimizer.Momentum(learning_rate=0.1, momentum=0.9), strategy=strategy)
        opt.minimize(loss)
        emas = w.attach_emas(step) if with_ema else {}
    return main, startup, loss, step, emas


def drop_sync_ops(program) -> None:
    block = program.global_block()
    for index in reversed(range(len(block.ops))):
        if block.ops[index].type in NO_CPU_KERNEL:
            block._remove_op(index)
    program._sync_with_cpp()


if __name__ == "__main__":
    sys.exit(w.main(build=build, fixup=drop_sync_ops))
