"""What a person or a scheduler calls: ``melbatch <command>`` (:mod:`.commands`), the job commands'
flags and configs (:mod:`.options`), ``melbatch demo`` (:mod:`.demo`), ``melbatch submit``
(:mod:`.submit`). ``python -m melbatch.cli`` and ``from melbatch.cli import main`` (jobs/*.py) run it."""

from melbatch.cli.commands import main

__all__ = ["main"]
