"""One rank of the same run as dp_worker.py, under fleet's static sharding optimizer.

Legacy IR only. ``strategy.sharding`` (``sharding_degree`` 2) splits the parameters between the ranks:
each rank keeps, updates and saves only the parameters it owns (its program has no others), receives
the others by broadcast from their owner at the start of each step, and reduces each gradient to its
owner. An EMA built after ``minimize`` therefore averages the rank's own parameters, and the ranks'
EMAs together average the whole model. The static optimizer splits parameters whatever ``stage``
says; it is set to 1 as a user would.

On top of fleet_worker's CPU shim: sharding's collectives use ring 1, whose gloo communicator is
created beside ring 0's; on Paddle 2.6 (where init_parallel_env sets up both rings) the sharding
optimizer reads FLAGS_dynamic_static_unified_comm, which a CPU-only 2.6 build does not expose
("Flag FLAGS_dynamic_static_unified_comm cannot get its value through this function"): it reads False
here, and CollectiveHelper._wait (waiting for NCCL endpoints) is a no-op.

    python -m paddle.distributed.launch --nproc_per_node=2 --log_dir LOG shard_worker.py OUT
"""

from __future__ import annotations

import sys

import dp_worker as w
import fleet_worker
import paddle
from fleet_worker import CollectiveHelper

SHARDING_RING = 1
init_ring0 = w.init_comm

if paddle.__version__.startswith("2."):
    _get_flags = paddle.get_flags
    paddle.get_flags = lambda flags: (
        {flags: False} if flags == "FLAGS_dynamic_static_unified_comm" else _get_flags(flags)
    )
    CollectiveHelper._wait = lambda self, *args, **kwargs: None


def init_comm(rank: int, nranks: int) -> None:
    init_ring0(rank, nranks)
    if not paddle.__version__.startswith("2."):
        from paddle.base import core

        store = core.create_or_get_global_tcp_store()
        core.CommContextManager.create_gloo_comm_context(store, str(SHARDING_RING), rank, nranks)


def shard(strategy) -> None:
    strategy.sharding = True
    strategy.sharding_configs = {"sharding_degree": 2, "stage": 1}


def build(nranks: int, with_ema: bool):
    return fleet_worker.build(nranks, with_ema, configure=shard)


if __name__ == "__main__":
    w.init_comm = init_comm
    sys.exit(w.main(build=build, fixup=fleet_worker.drop_sync_ops))
