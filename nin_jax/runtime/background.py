"""Work that the training loop hands off so that it never waits for it: drawing curves.png,
writing TensorBoard events, hashing and saving checkpoints."""

import collections
import concurrent.futures
from typing import Callable


class InOrder:
    """Runs jobs one at a time on a thread of its own, in the order they were submitted. A job's
    error is raised in the caller's thread, by the next `submit`, `raise_failed` or `wait`."""

    def __init__(self, name: str):
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._jobs: collections.deque[concurrent.futures.Future] = collections.deque()

    def submit(self, job: Callable[..., None], *args) -> None:
        self.raise_failed()
        self._jobs.append(self._executor.submit(job, *args))

    def raise_failed(self) -> None:
        """Raises the error of the first finished job that failed, if any; never waits."""
        while self._jobs and self._jobs[0].done():
            self._jobs.popleft().result()

    @property
    def idle(self) -> bool:
        """Whether every job submitted so far is done."""
        return all(job.done() for job in self._jobs)

    def wait(self) -> None:
        """Returns once every job submitted so far is done."""
        while self._jobs:
            self._jobs.popleft().result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(cancel_futures=True)
