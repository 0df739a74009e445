"""Tasks: how a batch becomes a model's keyword inputs and targets, and how its outputs are scored.

One module per task (`zoo/tasks/<name>.py`), registered with `@register_task("<name>")` and imported when a config
names it (`config.task`; options in `config.task_options`). The engine knows tasks, not models: see `Task`.
"""

from zoo.tasks.base import Task, get_task, reduce_sums, register_task, task_names

__all__ = ["Task", "get_task", "reduce_sums", "register_task", "task_names"]
