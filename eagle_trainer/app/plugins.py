"""User code that extends the registry (a target, a draft algorithm, an export format), loaded by every command.

    load_plugins(names, source)   the `eagle_trainer.plugins` entry points, then each of `names`: a dotted module
                                  name importable from sys.path, or the path of a .py file
    add_plugin_argument(parser)   --plugin NAME (repeatable) on an argparse command

A plugin is a module that registers what it brings when imported, e.g.

    from eagle_trainer import registry
    registry.register_target(registry.TargetSpec(architectures=("LlamaForCausalLM",)))

Every console script loads its plugins before anything looks the registry up: eagle-data, eagle-eval and
eagle-export from `--plugin`, eagle-train from the recipe's `plugins` list; all of them also read the entry-point
group ENTRY_POINT_GROUP of the installed distributions (an entry point naming a callable object has it called once
after its module is imported). Under torchrun each rank runs the command, and so loads the same plugins.

Loading is idempotent within a process: a module is imported once (a file under a module name derived from its
resolved path, kept in sys.modules), so a second load does not register anything twice. Plugins come only from
the command line, the recipe and the installed entry points: a checkpoint or export never names code to import.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import re
import sys
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "eagle_trainer.plugins"
FILE_MODULE_PREFIX = "eagle_trainer_plugin_"  # sys.modules name of a plugin loaded from a file: prefix, stem, hash

_called: set[str] = set()  # entry points (their `module:attr` value) whose callable has run in this process


class PluginError(ValueError):
    """A plugin that could not be loaded; a ValueError, so that a command reports it as a user error."""


def add_plugin_argument(parser) -> None:
    parser.add_argument("--plugin", action="append", default=None, metavar="MODULE_OR_FILE",
                        help="load a plugin that registers targets, draft algorithms or export formats: a dotted "
                             "module name importable from PYTHONPATH, or a .py file (repeatable)")


def load_plugins(names: Iterable[str] | None = (), source: str = "--plugin") -> list[str]:
    """Import every entry point of ENTRY_POINT_GROUP, then each of `names` (given by `source`, which error messages
    name: "--plugin" or "recipe plugins"); -> the module names loaded, in order. A plugin that fails to import
    raises PluginError naming it, where it came from and the underlying error."""
    loaded = [_load_entry_point(ep) for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]
    for name in names or ():
        loaded.append(_load_file(name, source) if _is_file(name) else _load_module(name, source))
    return loaded


def _is_file(name: str) -> bool:
    return name.endswith(".py") or "/" in name or "\\" in name


def file_module_name(path: Path) -> str:
    """The module name a plugin file is loaded under: the same for every spelling of its path."""
    resolved = str(path.resolve())
    stem = re.sub(r"\W", "_", path.stem)
    return f"{FILE_MODULE_PREFIX}{stem}_{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"


def _load_file(name: str, source: str) -> str:
    path = Path(name)
    module_name = file_module_name(path)
    if module_name in sys.modules:
        return module_name
    if not path.is_file():
        raise PluginError(f"plugin {name!r} (from {source}): no such file {str(path.resolve())!r}; check that the "
                          "file exists (a relative path is taken from the working directory), or give a dotted "
                          "module name importable from PYTHONPATH")
    spec = importlib.util.spec_from_file_location(module_name, path.resolve())
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before it runs, as an import does (dataclasses and pickling look it up)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise _failed(name, source, e) from e
    logger.info("plugin %s loaded from %s (%s) as module %s", name, path.resolve(), source, module_name)
    return module_name


def _load_module(name: str, source: str) -> str:
    fresh = name not in sys.modules
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):  # the plugin itself is missing
            raise PluginError(f"plugin {name!r} (from {source}) could not be imported: {type(e).__name__}: {e}; "
                              "check that the module is on PYTHONPATH (or installed in this environment), or give "
                              "the path of its .py file") from e
        raise _failed(name, source, e) from e
    except Exception as e:
        raise _failed(name, source, e) from e
    if fresh:
        logger.info("plugin %s loaded (%s)", name, source)
    return name


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep.dist, "name", None) or "an unnamed distribution"
    source = f"entry point {ep.name} = {ep.value} of {dist}, group {ENTRY_POINT_GROUP}"
    fresh = ep.module not in sys.modules
    try:
        obj = ep.load()
        if ep.attr is not None and callable(obj) and ep.value not in _called:
            _called.add(ep.value)  # before the call: a call that raises is not retried in this process
            obj()
    except Exception as e:
        raise _failed(ep.module, source, e) from e
    if fresh:
        logger.info("plugin %s loaded (%s)", ep.module, source)
    return ep.module


def _failed(name: str, source: str, error: Exception) -> PluginError:
    return PluginError(f"plugin {name!r} (from {source}) failed to load: {type(error).__name__}: {error}; fix the "
                       "plugin, or check that it and what it imports are on PYTHONPATH (EAGLE_DEBUG=1 shows the "
                       "traceback)")
