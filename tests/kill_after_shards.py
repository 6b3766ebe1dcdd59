"""Fault injection for the resume tests: ``python tests/kill_after_shards.py N <merge_checkpoints flags>`` runs
``merge_checkpoints.main`` and SIGKILLs its own process once N output shards are finished."""

from __future__ import annotations

import os
import signal
import sys

import merge_checkpoints
from merge_engine.tensor_writer import ShardedWriter


def main() -> None:
    kill_after, argv = int(sys.argv[1]), sys.argv[2:]
    finish_shard = ShardedWriter._finish_shard
    finished = 0

    def finish_then_kill(self, shard) -> None:
        nonlocal finished
        finish_shard(self, shard)
        finished += 1
        if finished >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    ShardedWriter._finish_shard = finish_then_kill
    merge_checkpoints.main(argv)


if __name__ == "__main__":
    main()
