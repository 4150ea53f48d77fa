"""Reward registry: built-ins, entry points and dotted paths, and building rewards from a recipe.

Three ways a reward becomes known by name:

1. built-ins: every module of ``refiner_rl.rewards`` (the repository's ``rewards/`` folder) is imported and
   its classes register themselves with :func:`register_reward`;
2. third-party packages declare an entry point in the group ``refiner_rl.rewards``::

       [project.entry-points."refiner_rl.rewards"]
       my_reward = "my_pkg.rewards:MyReward"

   (the class is registered under its ``name`` attribute, or the entry-point name when it has none);
3. a dotted path used directly as the name in a recipe, ``package.module:attr`` or ``package.module.attr``,
   where ``attr`` is a :class:`Reward` subclass or a plain TRL reward function (wrapped in
   :class:`~refiner_rl.scoring.functions.FunctionReward`).

A recipe lists rewards as specs::

    rewards:
      - {name: patch_dreamsim, weight: 1.0, patch_size: 64}
      - {name: masked_pixel, weight: 0.5}
      - {name: my_pkg.rewards.brightness, weight: 0.1}

``weight`` belongs to the recipe, not to the reward: :func:`split_weights` takes it out of the specs (the GRPO
config turns it into TRL's ``reward_weights``). Every other key besides ``name`` is a constructor option of the
reward (a keyword parameter of a function); unknown names and unknown options are errors that list what would
work. :func:`build_reward_funcs` builds rewards from specs, :class:`Reward` instances and plain callables alike.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import pkgutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from refiner_rl.errors import ConfigError
from refiner_rl.scoring.base import Reward
from refiner_rl.scoring.functions import FunctionReward, keyword_parameters

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "refiner_rl.rewards"
BUILTIN_PACKAGE = "refiner_rl.rewards"

_REGISTRY: dict[str, type[Reward]] = {}
_SOURCES: dict[str, str] = {}  # name -> "builtin" | "entry point <dist>" | "registered"
_LOAD_ERRORS: dict[str, str] = {}  # module or entry point -> error, shown when a name is unknown
_discovered = False


class RewardConfigError(ConfigError):
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


def _import_dotted(path: str) -> Any:
    """The object a dotted path names: ``package.module:attr.sub`` or ``package.module.attr`` (the longest
    importable module prefix, then attributes)."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
        attrs = attr.split(".")
    else:
        parts = path.split(".")
        module_name, attrs = path, []
        for cut in range(len(parts) - 1, 0, -1):
            try:
                found = importlib.util.find_spec(".".join(parts[:cut])) is not None
            except (ImportError, ValueError):  # a parent is a module, not a package, or is missing
                found = False
            if found:
                module_name, attrs = ".".join(parts[:cut]), parts[cut:]
                break
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attrs:
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as e:
        raise RewardConfigError(
            f"cannot import reward {path!r} ({type(e).__name__}: {e}); a dotted path has the form "
            "'package.module:name' or 'package.module.name' (a Reward subclass or a reward function)"
        ) from e
    return obj


def resolve_reward(name: str) -> type[Reward] | Callable[..., Any]:
    """The :class:`Reward` subclass or the plain reward function a recipe ``name`` means: a registered name
    first, else a dotted path (``package.module:attr`` or ``package.module.attr``)."""
    if ":" not in name:
        known = available_rewards()
        if name in known:
            return known[name]
        if "." not in name:
            msg = f"unknown reward {name!r}; known rewards: {', '.join(known) or '(none)'}"
            msg += (
                ". A third-party reward or a reward function can also be named by its dotted path 'package.module:name'"
            )
            if _LOAD_ERRORS:
                msg += "; some plug-ins failed to load: " + "; ".join(f"{k}: {v}" for k, v in _LOAD_ERRORS.items())
            raise RewardConfigError(msg)
    obj = _import_dotted(name)
    if inspect.isclass(obj) and issubclass(obj, Reward):
        return obj
    if callable(obj) and not inspect.isclass(obj):
        return obj
    raise RewardConfigError(
        f"{name!r} is {obj!r}: neither a subclass of refiner_rl.scoring.Reward nor a reward function "
        "f(prompts, completions, **kwargs) -> list[float | None]"
    )


def get_reward_class(name: str) -> type[Reward]:
    """The class for a registered name or a dotted path ``package.module:Class``."""
    obj = resolve_reward(name)
    if not inspect.isclass(obj):
        raise RewardConfigError(f"{name!r} is a reward function, not a subclass of refiner_rl.scoring.Reward")
    return obj


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


WEIGHT_KEY = "weight"


def split_weights(specs: Sequence[Any]) -> tuple[list[Any], list[float] | None]:
    """Take the per-entry ``weight:`` out of reward specs: ``(specs without weight, weights)``.

    ``weights`` is ``None`` when no entry gives one (TRL's ``reward_weights``, or all 1, then apply); otherwise
    one float per entry, 1.0 for an entry without ``weight`` (items that are not mappings, such as a name, a
    :class:`Reward` or a function, count as entries without a weight). A weight that is not a number is a
    :class:`RewardConfigError` naming the entry."""
    if specs is None or isinstance(specs, (str, Mapping)):
        raise RewardConfigError("`rewards` must be a list of specs like [{name: masked_pixel, weight: 1.0}]")
    out, weights, given = [], [], False
    for i, spec in enumerate(specs):
        if isinstance(spec, Mapping) and WEIGHT_KEY in spec:
            value = spec[WEIGHT_KEY]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RewardConfigError(f"rewards[{i}]: `weight` must be a number, got {value!r}")
            spec = {k: v for k, v in spec.items() if k != WEIGHT_KEY}
            weights.append(float(value))
            given = True
        else:
            weights.append(1.0)
        out.append(spec)
    return out, (weights if given else None)


def build_reward(
    spec: Mapping[str, Any] | str, *, device: Any = None, dtype: Any = None, where: str = "reward"
) -> Reward:
    """One reward from a spec ``{name: ..., **options}`` (or a bare name); ``name`` may be a registered reward,
    or a dotted path to a :class:`Reward` subclass or a reward function. ``weight`` is not an option: take it out
    with :func:`split_weights` first."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise RewardConfigError(f"{where}: expected a mapping like {{name: masked_pixel}}, got {spec!r}")
    options = dict(spec)
    name = options.pop("name", None)
    if not name:
        raise RewardConfigError(f"{where}: missing `name` (got keys {sorted(options)})")
    if WEIGHT_KEY in options:
        raise RewardConfigError(
            f"{where}: `weight` is the recipe's, not an option of reward {name!r}: the GRPO config moves it to "
            "`reward_weights` (refiner_rl.scoring.registry.split_weights does it for other callers)"
        )
    try:
        target = resolve_reward(str(name))
    except RewardConfigError as e:
        raise RewardConfigError(f"{where}: {e}") from None
    if inspect.isclass(target):
        accepted = accepted_options(target)
    else:
        params, takes_any = keyword_parameters(target)
        accepted = None if takes_any else params
    if accepted is not None:
        unknown = [k for k in options if k not in accepted]
        if unknown:
            raise RewardConfigError(
                f"{where}: reward {name!r} has no option {', '.join(repr(k) for k in unknown)}; "
                f"accepted options: {', '.join(accepted) or '(none)'}"
            )
    if inspect.isclass(target):
        if device is not None:
            options.setdefault("device", device)
        if dtype is not None:
            options.setdefault("dtype", dtype)
    try:
        return target(**options) if inspect.isclass(target) else FunctionReward(target, **options)
    except (TypeError, ValueError) as e:
        raise RewardConfigError(f"{where}: cannot build reward {name!r}: {e}") from e


def build_reward_funcs(items: Iterable[Any], *, device: Any = None, dtype: Any = None) -> list[Reward]:
    """Rewards from TRL-style ``reward_funcs``: each item is a recipe spec (a mapping or a name string, see
    :func:`build_reward`), a :class:`Reward` instance (kept as is), or a plain callable
    ``f(prompts, completions, **kwargs) -> list[float | None]``, sync or ``async def`` (wrapped in
    :class:`~refiner_rl.scoring.functions.FunctionReward`). ``device``/``dtype`` apply to specs that set none.
    Weights are not part of a reward: a spec with ``weight`` is an error (see :func:`split_weights`)."""
    if items is None or isinstance(items, (str, Mapping)) or callable(items):
        raise RewardConfigError("`reward_funcs` must be a list: specs like {name: masked_pixel}, rewards or functions")
    out: list[Reward] = []
    for i, item in enumerate(items):
        if isinstance(item, Reward):
            out.append(item)
        elif isinstance(item, (str, Mapping)):
            out.append(build_reward(item, device=device, dtype=dtype, where=f"rewards[{i}]"))
        elif inspect.isclass(item) and issubclass(item, Reward):
            raise RewardConfigError(f"rewards[{i}]: {item.__qualname__} is a class; pass an instance or its name")
        elif callable(item):
            out.append(FunctionReward(item))
        else:
            raise RewardConfigError(
                f"rewards[{i}]: {item!r} is not a reward: give a spec {{name: ...}}, a Reward or a function"
            )
    return out


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
