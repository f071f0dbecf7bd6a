"""The example from Paddle's ExponentialMovingAverage doc, with paddle_ema in place of Paddle's class.

3 passes x 6 batches of Adam on a one-layer net, then the two usages of ``apply``. The only change
from the doc besides the import: PIR's ``Program.clone()`` has no ``for_test``, so under PIR the test
program is cloned with an ``IrMapping`` and fetches the clone's value; and every fetch is by handle,
since PIR values have no fetchable ``.name``. It prints the test output under the averaged and the raw
weights on the same batch after each pass.

Run: ``python examples/seed_example.py``
"""

import argparse

# --help (and an unknown argument) ends here, before Paddle loads.
argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()

import numpy  # noqa: E402
import paddle  # noqa: E402
import paddle.static as static  # noqa: E402

from paddle_ema import ExponentialMovingAverage  # noqa: E402

paddle.enable_static()

data = static.data(name='x', shape=[-1, 5], dtype='float32')
hidden = static.nn.fc(x=data, size=10)
cost = paddle.mean(hidden)

if paddle.framework.in_pir_mode():
    mapping = paddle.pir.IrMapping()
    test_program = static.default_main_program().clone(mapping)
    test_hidden = mapping.look_up(hidden)
else:
    test_program = static.default_main_program().clone(for_test=True)
    test_hidden = hidden

optimizer = paddle.optimizer.Adam(learning_rate=0.001)
optimizer.minimize(cost)

ema = ExponentialMovingAverage(0.999)
ema.update()

place = paddle.CPUPlace()
exe = static.Executor(place)
exe.run(static.default_startup_program())

for pass_id in range(3):
    for _batch_id in range(6):
        data = numpy.random.random(size=(10, 5)).astype('float32')
        exe.run(program=static.default_main_program(),
                feed={'x': data},
                fetch_list=[cost])  # by handle: PIR values have no fetchable .name

    # usage 1
    with ema.apply(exe):
        data = numpy.random.random(size=(10, 5)).astype('float32')
        ema_out, = exe.run(program=test_program,
                           feed={'x': data},
                           fetch_list=[test_hidden])
    raw_out, = exe.run(program=test_program, feed={'x': data}, fetch_list=[test_hidden])

    # usage 2
    with ema.apply(exe, need_restore=False):
        data = numpy.random.random(size=(10, 5)).astype('float32')
        exe.run(program=test_program,
                feed={'x': data},
                fetch_list=[test_hidden])
    ema.restore(exe)

    print(f"pass {pass_id}: 6 Adam steps; test output with EMA weights mean {ema_out.mean():+.5f}, "
          f"with raw weights mean {raw_out.mean():+.5f}")

mode = "PIR" if paddle.framework.in_pir_mode() else "legacy IR"
print(f"paddle {paddle.__version__} ({mode}): averaged {len(ema.parameter_names)} parameters "
      f"({', '.join(ema.parameter_names)}) over 18 steps with decay {ema.decay}; "
      "applied and restored them 6 times")
