"""`Task` (the lsst.pipe.base.Task handles: name hierarchy, subtasks, metadata, timer, log),
`Struct`, `TaskError` and clobber/backup file writing."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

from .config import Config, ConfigurableField, _TASK_REGISTRY, _qualified
from .metadata import TaskMetadata
from .timing import logInfo

__all__ = ["Task", "Struct", "TaskError", "write_checked"]


class TaskError(RuntimeError):
    """A task-level failure, e.g. an existing output that differs and may not be clobbered."""


class Struct:
    """A plain attribute bag (lsst.pipe.base.Struct)."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)

    def getDict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __eq__(self, other):
        return isinstance(other, Struct) and self.__dict__ == other.__dict__

    def __repr__(self):
        return "Struct(" + ", ".join(f"{k}={type(v).__name__}" for k, v in self.__dict__.items()) + ")"


def _backup_name(path: Path) -> Path:
    n = 1
    while True:
        candidate = path.with_name(f"{path.name}~{n}")
        if not candidate.exists():
            return candidate
        n += 1


def write_checked(path: str | Path, content: dict, *, clobber: bool, doBackup: bool, what: str,
                  compare=None) -> Path:
    """Write `content` as JSON at `path` with the API page's clobber/doBackup semantics.

    Existing file: equal content (by `compare(old, new)`, default ==) -> left as is;
    different and ``clobber=False`` -> `TaskError`; ``clobber=True`` -> replaced, the old one
    first renamed to ``path~N`` when ``doBackup``. The write itself is atomic, the file's mode
    follows the umask, and a jcal output folder's manifest is updated to list it.
    """
    from ..io.atomic import current_umask
    from ..io.manifest import record
    path = Path(path)
    text = json.dumps(content, indent=2, sort_keys=False) + "\n"
    written = [path.name]
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (ValueError, RecursionError):
            old = None
        same = (compare(old, content) if compare else old == json.loads(text)) if old is not None else False
        if same and not clobber:
            return path
        if not clobber:
            raise TaskError(f"{what}: existing {str(path)!r} differs from the new one and clobber=False "
                            "(pass clobber=True to replace it; doBackup=True keeps the old one as ~N)")
        if doBackup:
            backup = _backup_name(path)
            os.rename(path, backup)
            written.append(backup.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's files are private (0600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    record(path.parent, written)
    return path


class Task:
    """Base task: a config, a name in a hierarchy, subtasks, metadata, a logger and timers."""

    ConfigClass: type[Config] = Config
    _DefaultName: str | None = None
    canMultiprocess: bool = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _TASK_REGISTRY[_qualified(cls)] = cls

    def __init__(self, config: Config | None = None, name: str | None = None, parentTask: "Task | None" = None,
                 log: logging.Logger | None = None):
        self.metadata = TaskMetadata()
        self._parentTask = parentTask
        if parentTask is not None:
            if name is None:
                raise TaskError("a subtask needs a name")
            self._name = name
            self._fullName = parentTask.getFullName() + "." + name
            if config is None:
                config = getattr(parentTask.config, name).value
            self._taskDict = parentTask._taskDict
        else:
            name = name or self._DefaultName
            if name is None:
                raise TaskError(f"{type(self).__name__}: no name given and no _DefaultName")
            self._name = self._fullName = name
            if config is None:
                config = self.ConfigClass()
            self._taskDict = {}
        if not isinstance(config, self.ConfigClass):
            raise TaskError(f"{type(self).__name__} needs a {self.ConfigClass.__name__}, got {type(config).__name__}")
        self.config = config
        self.log = log.getChild(name) if (log is not None and parentTask is None) else \
            logging.getLogger("jcal." + self._fullName)
        self._taskDict[self._fullName] = weakref.ref(self)

    # -- names --------------------------------------------------------------------------------------
    def getName(self) -> str:
        return self._name

    def getFullName(self) -> str:
        return self._fullName

    def getTaskDict(self) -> dict[str, "weakref.ReferenceType[Task]"]:
        """Shallow copy of {full name: weakref to task} for the whole hierarchy."""
        return dict(self._taskDict)

    # -- subtasks -----------------------------------------------------------------------------------
    def makeSubtask(self, name: str, **keyArgs: Any) -> None:
        """Create ``self.<name>`` from ``self.config.<name>`` (a `ConfigurableField`)."""
        for reserved in ("config", "parentTask"):
            if reserved in keyArgs:
                raise TaskError(f"makeSubtask: {reserved!r} is supplied automatically")
        field = type(self.config)._fields.get(name)
        if not isinstance(field, ConfigurableField):
            raise TaskError(f"makeSubtask({name!r}): config has no ConfigurableField {name!r}")
        inst = getattr(self.config, name)
        setattr(self, name, inst.target(config=inst.value, name=name, parentTask=self, **keyArgs))

    @classmethod
    def makeField(cls, doc: str) -> ConfigurableField:
        return ConfigurableField(doc=doc, target=cls)

    # -- metadata & timing --------------------------------------------------------------------------
    def emptyMetadata(self) -> None:
        for ref in self._taskDict.values():
            task = ref()
            if task is not None:
                task.metadata = TaskMetadata()

    def getFullMetadata(self) -> TaskMetadata:
        """{full name with '.'→':': that task's metadata} for this task and all subtasks."""
        full = TaskMetadata()
        for fullName, ref in self._taskDict.items():
            task = ref()
            if task is not None:
                full._data[fullName.replace(".", ":")] = task.metadata
        return full

    @contextlib.contextmanager
    def timer(self, name: str, logLevel: int = logging.DEBUG):
        logInfo(self, name + "Start", logLevel)
        try:
            yield
        finally:
            logInfo(self, name + "End", logLevel)

    # -- misc ---------------------------------------------------------------------------------------
    def getResourceConfig(self):
        return None

    def getSchemaCatalogs(self) -> dict[str, Any]:
        return {}

    def getAllSchemaCatalogs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for ref in self._taskDict.values():
            task = ref()
            if task is not None:
                out.update(task.getSchemaCatalogs())
        return out

    def __reduce__(self):
        return (type(self), (self.config, self._name, self._parentTask))
