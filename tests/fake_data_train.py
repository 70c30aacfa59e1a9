"""`train.py` on `conftest.fake_fashion_mnist` data, for tests that need training in a process of
its own, to kill or interrupt it, and `python -m nin_jax.predict` on the same data:

    python tests/fake_data_train.py NUM_EXAMPLES [train.py flags]
    python tests/fake_data_train.py NUM_EXAMPLES predict [nin_jax.predict flags]

With SLOW_STEPS=K:S in the environment, every train step after step K takes S seconds longer on
the device, as a step at 224 px does on a CPU: the loop then waits inside JAX, where Python runs
no signal handler.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this tree's nin_jax and train.py

from nin_jax.runtime import commands  # noqa: E402

commands.begin()  # as the commands do, before their imports

import train  # noqa: E402
from conftest import fake_fashion_mnist  # noqa: E402



def slow_down_steps(after_step: int, seconds: float) -> None:
    """Makes `steps.step_functions` give a train step whose outputs wait `seconds` on the device
    once the state's step exceeds `after_step`."""
    import jax

    from nin_jax import steps

    step_functions = steps.step_functions

    def slow_step_functions(*args, **kwargs):
        train_step, eval_step = step_functions(*args, **kwargs)

        def slow_train_step(*step_args, **step_kwargs):
            state, carry = train_step(*step_args, **step_kwargs)

            def wait(step, carry):
                if step > after_step:
                    time.sleep(seconds)
                return carry

            shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), carry)
            return state, jax.pure_callback(wait, shapes, state.step, carry)

        return slow_train_step, eval_step

    steps.step_functions = slow_step_functions


if __name__ == "__main__":
    if "SLOW_STEPS" in os.environ:
        after_step, seconds = os.environ["SLOW_STEPS"].split(":")
        slow_down_steps(int(after_step), float(seconds))
    with fake_fashion_mnist(int(sys.argv[1])):
        if sys.argv[2:3] == ["predict"]:
            from nin_jax.tools import predict

            commands.run(lambda: predict.main(sys.argv[3:]))
        commands.run(lambda: train.main(sys.argv[2:]))
