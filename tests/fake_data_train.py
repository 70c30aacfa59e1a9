"""`train.py` on `conftest.fake_fashion_mnist` data, for tests that need training in a process of
its own, to kill or interrupt it, and `python -m nin_jax.predict` on the same data:

    python tests/fake_data_train.py NUM_EXAMPLES [train.py flags]
    python tests/fake_data_train.py NUM_EXAMPLES predict [nin_jax.predict flags]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this tree's nin_jax and train.py

from nin_jax import commands  # noqa: E402

commands.begin()  # as the commands do, before their imports

import train  # noqa: E402
from conftest import fake_fashion_mnist  # noqa: E402

if __name__ == "__main__":
    with fake_fashion_mnist(int(sys.argv[1])):
        if sys.argv[2:3] == ["predict"]:
            from nin_jax import predict

            commands.run(lambda: predict.main(sys.argv[3:]))
        commands.run(lambda: train.main(sys.argv[2:]))
