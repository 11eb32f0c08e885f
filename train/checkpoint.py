"""Checkpoints with orbax: the train state (params, optimizer state, step, RNG) and the loader position.

Saves are asynchronous (the arrays are copied off the devices before ``save`` returns, the files are
written in the background), atomic (orbax writes into a temporary folder and renames it when complete,
so a killed run never leaves a half-written step behind), and only the last ``keep`` are kept.
Restoring takes a target whose leaves carry the *current* mesh's shardings, so a checkpoint written on
one mesh shape loads onto another.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=force,
        )

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[int, Any, dict]:
        """(step, state placed as ``abstract_state``'s shardings say, loader state)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return step, out["state"], dict(out["data"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
