"""Reward registry: built-ins, entry points and dotted paths, and building rewards from a recipe.

Three ways a reward class becomes known by name:

1. built-ins: every module of ``refiner_rl.rewards`` (the repository's ``rewards/`` folder) is imported and
   its classes register themselves with :func:`register_reward`;
2. third-party packages declare an entry point in the group ``refiner_rl.rewards``::

       [project.entry-points."refiner_rl.rewards"]
       my_reward = "my_pkg.rewards:MyReward"

   (the class is registered under its ``name`` attribute, or the entry-point name when it has none);
3. a dotted path ``package.module:Class`` used directly as the name in a recipe.

A recipe lists rewards as specs::

    rewards:
      - {name: patch_dreamsim, weight: 1.0, patch_size: 64}
      - {name: masked_pixel, weight: 0.5}

Every key besides ``name`` and ``weight`` is a constructor option of the reward; unknown names and unknown
options are errors that list what would work.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import pkgutil
from collections.abc import Iterable, Mapping
from typing import Any

from refiner_rl.scoring.base import Reward

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "refiner_rl.rewards"
BUILTIN_PACKAGE = "refiner_rl.rewards"

_REGISTRY: dict[str, type[Reward]] = {}
_SOURCES: dict[str, str] = {}  # name -> "builtin" | "entry point <dist>" | "registered"
_LOAD_ERRORS: dict[str, str] = {}  # module or entry point -> error, shown when a name is unknown
_discovered = False


class RewardConfigError(ValueError):
    """A reward spec in a recipe is wrong (unknown name, unknown option, missing fields)."""


def register_reward(cls: type[Reward]) -> type[Reward]:
    """Class decorator: make ``cls`` known under ``cls.name``."""
    if not (inspect.isclass(cls) and issubclass(cls, Reward)):
        raise TypeError(f"@register_reward expects a subclass of refiner_rl.scoring.Reward, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} must set a class attribute `name` to be registered")
    _add(cls.name, cls, "builtin" if cls.__module__.startswith(BUILTIN_PACKAGE + ".") else "registered")
    return cls


def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _add(name: str, cls: type[Reward], source: str, override_source: bool = False) -> None:
    old = _REGISTRY.get(name)
    if old is not None and old is not cls and _qualname(old) != _qualname(cls):
        raise ValueError(f"reward name {name!r} is taken by {_qualname(old)}; {_qualname(cls)} needs another name")
    _REGISTRY[name] = cls
    if override_source:
        _SOURCES[name] = source
    else:
        _SOURCES.setdefault(name, source)


def _discover_builtins() -> None:
    try:
        package = importlib.import_module(BUILTIN_PACKAGE)
    except ImportError as e:  # the package is part of this distribution; say so if it is broken
        _LOAD_ERRORS[BUILTIN_PACKAGE] = f"{type(e).__name__}: {e}"
        return
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module = f"{BUILTIN_PACKAGE}.{info.name}"
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - one broken plug-in must not hide the others
            _LOAD_ERRORS[module] = f"{type(e).__name__}: {e}"
            logger.warning("could not import built-in reward module %s: %s", module, e)


def _discover_entry_points() -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
        try:
            cls = ep.load()
            if not (inspect.isclass(cls) and issubclass(cls, Reward)):
                raise TypeError(f"{ep.value} is not a subclass of refiner_rl.scoring.Reward")
            _add(cls.name or ep.name, cls, f"entry point ({dist})", override_source=True)
        except Exception as e:  # noqa: BLE001
            _LOAD_ERRORS[f"entry point {ep.name} = {ep.value} ({dist})"] = f"{type(e).__name__}: {e}"
            logger.warning("could not load reward entry point %s = %s: %s", ep.name, ep.value, e)


def discover(refresh: bool = False) -> None:
    """Import the built-in reward modules and load the entry points (once; ``refresh`` re-reads entry
    points, e.g. after installing a plug-in in the running process)."""
    global _discovered
    if _discovered and not refresh:
        return
    _discovered = True
    _discover_builtins()
    _discover_entry_points()


def available_rewards() -> dict[str, type[Reward]]:
    """Every known reward class by name: built-ins, entry points and anything registered so far."""
    discover()
    return dict(sorted(_REGISTRY.items()))


def reward_source(name: str) -> str:
    """Where a registered reward comes from: ``builtin``, ``entry point (dist)`` or ``registered``."""
    discover()
    return _SOURCES.get(name, "?")


def load_errors() -> dict[str, str]:
    """Plug-ins (built-in modules or entry points) that failed to import, with their errors."""
    discover()
    return dict(_LOAD_ERRORS)


def _import_dotted(path: str) -> type[Reward]:
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise RewardConfigError(
            f"cannot import reward {path!r} ({type(e).__name__}: {e}); "
            "a dotted path has the form 'package.module:ClassName'"
        ) from e
    if not (inspect.isclass(obj) and issubclass(obj, Reward)):
        raise RewardConfigError(f"{path!r} is not a subclass of refiner_rl.scoring.Reward")
    return obj


def get_reward_class(name: str) -> type[Reward]:
    """The class for a registered name or a dotted path ``package.module:Class``."""
    if ":" in name:
        return _import_dotted(name)
    known = available_rewards()
    if name in known:
        return known[name]
    msg = f"unknown reward {name!r}; known rewards: {', '.join(known) or '(none)'}"
    msg += ". A third-party reward can also be named by its dotted path 'package.module:ClassName'"
    if _LOAD_ERRORS:
        msg += "; some plug-ins failed to load: " + "; ".join(f"{k}: {v}" for k, v in _LOAD_ERRORS.items())
    raise RewardConfigError(msg)


def accepted_options(cls: type[Reward]) -> list[str] | None:
    """Keyword options the reward's constructor takes (``None`` = it takes any keyword)."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        names += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return sorted(set(names))
        # **kwargs: assume they are passed on to the parent class, whose options count too
    return None


def build_reward(
    spec: Mapping[str, Any] | str, *, device: Any = None, dtype: Any = None, where: str = "reward"
) -> Reward:
    """One reward from a spec ``{name: ..., weight: ..., **options}`` (or a bare name)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise RewardConfigError(f"{where}: expected a mapping like {{name: masked_pixel, weight: 1.0}}, got {spec!r}")
    options = dict(spec)
    name = options.pop("name", None)
    if not name:
        raise RewardConfigError(f"{where}: missing `name` (got keys {sorted(options)})")
    try:
        cls = get_reward_class(str(name))
    except RewardConfigError as e:
        raise RewardConfigError(f"{where}: {e}") from None
    accepted = accepted_options(cls)
    if accepted is not None:
        unknown = [k for k in options if k not in accepted]
        if unknown:
            raise RewardConfigError(
                f"{where}: reward {name!r} has no option {', '.join(repr(k) for k in unknown)}; "
                f"accepted options: {', '.join(accepted)}"
            )
    if device is not None:
        options.setdefault("device", device)
    if dtype is not None:
        options.setdefault("dtype", dtype)
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise RewardConfigError(f"{where}: cannot build reward {name!r}: {e}") from e


def build_rewards(specs: Iterable[Mapping[str, Any] | str], *, device: Any = None, dtype: Any = None) -> list[Reward]:
    """Rewards from the recipe's ``rewards:`` list. ``device``/``dtype`` apply where a spec sets none."""
    if specs is None or isinstance(specs, (str, Mapping)):
        raise RewardConfigError("`rewards` must be a list of specs like [{name: masked_pixel, weight: 1.0}]")
    return [build_reward(s, device=device, dtype=dtype, where=f"rewards[{i}]") for i, s in enumerate(specs)]


def reward_labels(rewards: Iterable[Reward]) -> list[str]:
    """Unique labels for logging and tables: the reward's name, suffixed ``_2``, ``_3``... on repeats (a recipe
    may use ``masked_pixel`` twice, inside and outside the mask)."""
    labels, seen = [], {}
    for r in rewards:
        base = r.name or type(r).__name__
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return labels


def check_required_fields(rewards: Iterable[Reward], available_columns: Iterable[str]) -> None:
    """Raise :class:`RewardConfigError` naming each reward whose ``required_fields`` the data lacks.

    ``prompt`` is always available (prompts are passed positionally)."""
    available = set(available_columns) | {"prompt"}
    problems = []
    for r in rewards:
        missing = [f for f in r.required_fields if f not in available]
        if missing:
            problems.append(f"reward {r.name!r} needs {', '.join(missing)}")
    if problems:
        raise RewardConfigError(
            "; ".join(problems) + f" — the data provides {', '.join(sorted(available))}. "
            "Add the missing fields to the records or remove the reward from the recipe"
        )
