"""The registry of Darumeru tasks and their groups."""
from typing import Dict, List, Type

from lep_megatron.common.io import UserInputError
from lep_megatron.evaluation.tasks.base import Task, TaskSettings

TASKS: Dict[str, Type[Task]] = {}


def register(cls: Type[Task]) -> Type[Task]:
    if cls.name in TASKS:
        raise ValueError(f"task {cls.name} registered twice")
    TASKS[cls.name] = cls
    return cls


# imported for their @register side effect
from lep_megatron.evaluation.tasks import darumeru, mmlu, rucola, treeway  # noqa: E402,F401

GROUPS: Dict[str, List[str]] = {}
for _name, _cls in TASKS.items():
    GROUPS.setdefault(_cls.group, []).append(_name)


def resolve(selection: List[str]) -> List[str]:
    """Task names from names, group names or `all`, in registry order without repeats."""
    wanted = set()
    for item in selection:
        if item == "all":
            wanted |= set(TASKS)
        elif item in GROUPS:
            wanted |= set(GROUPS[item])
        elif item in TASKS:
            wanted.add(item)
        else:
            raise UserInputError(
                f"tasks: unknown task or group {item!r}; choose from all, {', '.join(GROUPS)}, {', '.join(TASKS)}"
            )
    return [name for name in TASKS if name in wanted]


def build(name: str, settings: TaskSettings) -> Task:
    return TASKS[name](settings)
