"""The peers of a job (nin_jax/runtime/peers.py): where the runtime's client is found, and where
the runtime's log of several processes goes."""

import os
import subprocess
import sys
import time

from nin_jax.runtime import peers

from conftest import PRECIOUS, REPO_ROOT


def test_the_runtime_client_is_where_peers_reaches_for_it():
    """`peers.client` is the one place that reads JAX's private `jax._src.distributed`: should JAX
    move it, this fails before any job of several processes does. Without `jax.distributed` started
    there is no client."""
    assert peers.client() is None


# Plants a link where the runtime's log of this very process used to go (a name that anyone could
# guess from the host and the pid), then routes the log as a process of a multi-process job does.
ROUTE_LOG = """
import os, socket, sys, tempfile
guessable = f"nin_jax_runtime_{socket.gethostname()}_{os.getpid()}.log"
os.symlink(sys.argv[1], os.path.join(tempfile.gettempdir(), guessable))
from nin_jax.runtime import peers
log = peers.route_runtime_log(2)
folder = os.stat(os.path.dirname(log))
print(log, oct(folder.st_mode & 0o777), folder.st_uid == os.geteuid())
"""


def test_the_runtime_log_of_several_processes_goes_to_a_private_folder_not_through_a_planted_link(tmp_path, precious):
    shared_tmp = tmp_path / "tmp"
    shared_tmp.mkdir(mode=0o777)
    result = subprocess.run([sys.executable, "-c", ROUTE_LOG, str(precious)], capture_output=True, text=True,
                            timeout=60, cwd=REPO_ROOT, env={**os.environ, "TMPDIR": str(shared_tmp)})
    assert result.returncode == 0, result.stderr
    assert precious.read_text() == PRECIOUS
    log, mode, owned = result.stdout.split()
    folder = os.path.dirname(log)
    assert os.path.dirname(folder) == str(shared_tmp) and os.path.basename(log) == "runtime.log"
    assert (mode, owned) == ("0o700", "True")
    deadline = time.monotonic() + 30
    while os.path.exists(folder) and time.monotonic() < deadline:  # the reporter ends with its process
        time.sleep(0.1)
    assert not os.path.exists(folder)  # nothing was logged: nothing is left behind
