"""Short ``--help`` of ``refiner-rl sft|grpo``, read from the config classes' source with ``ast``.

Importing the configs means importing transformers and TRL (seconds, and their ~300 inherited options). The help
instead parses the source of the project's own config dataclasses (names, types, defaults, help texts; constants
such as the list of step rules are read from the module that defines them), and the help text of a few common
inherited options from transformers' and TRL's sources. ``--help-all`` builds the real parser for everything.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import textwrap

# The project's own option groups per stage: (title, module, class).
GROUPS = {
    "sft": [
        ("model", "refiner_rl.configs", "ModelArguments"),
        ("data", "refiner_rl.configs", "DataArguments"),
        ("SFT", "refiner_rl.trainers.sft_config", "FlowSFTConfig"),
    ],
    "grpo": [
        ("model", "refiner_rl.configs", "ModelArguments"),
        ("data", "refiner_rl.configs", "DataArguments"),
        ("GRPO", "refiner_rl.trainers.grpo_config", "FlowGRPOConfig"),
    ],
    "refl": [
        ("model", "refiner_rl.configs", "ModelArguments"),
        ("data", "refiner_rl.configs", "DataArguments"),
        ("ReFL", "refiner_rl.trainers.refl_config", "FlowReFLConfig"),
    ],
}
# Inherited options most runs set, with where their help text is: (module, class).
TRAINING_ARGUMENTS = ("transformers.training_args", "TrainingArguments")
GRPO_CONFIG = ("trl.trainer.grpo_config", "GRPOConfig")
COMMON = [
    ("output_dir", TRAINING_ARGUMENTS),
    ("max_steps", TRAINING_ARGUMENTS),
    ("num_train_epochs", TRAINING_ARGUMENTS),
    ("per_device_train_batch_size", TRAINING_ARGUMENTS),
    ("gradient_accumulation_steps", TRAINING_ARGUMENTS),
    ("lr_scheduler_type", TRAINING_ARGUMENTS),
    ("warmup_steps", TRAINING_ARGUMENTS),
    ("save_total_limit", TRAINING_ARGUMENTS),
    ("seed", TRAINING_ARGUMENTS),
    ("run_name", TRAINING_ARGUMENTS),
    ("use_cpu", TRAINING_ARGUMENTS),
]
COMMON_GRPO = [
    ("steps_per_generation", GRPO_CONFIG),
    ("num_iterations", GRPO_CONFIG),
    ("scale_rewards", GRPO_CONFIG),
    ("multi_objective_aggregation", GRPO_CONFIG),
    ("reward_weights", GRPO_CONFIG),
    ("epsilon_high", GRPO_CONFIG),
]
RESUME_HELP = (
    "`true` or `latest`: continue from the newest checkpoint-N in output_dir; `latest_valid`: from the newest "
    "intact one; or a checkpoint folder."
)


def _source_file(module: str) -> str:
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)  # a top-level package is located without importing it
    base = os.path.join(list(spec.submodule_search_locations)[0], *rest)
    return base + ".py" if os.path.isfile(base + ".py") else os.path.join(base, "__init__.py")


@functools.cache
def _tree(module: str) -> ast.Module:
    with open(_source_file(module)) as f:
        return ast.parse(f.read())


def _definition(module: str, name: str, depth: int = 0) -> tuple[str, ast.expr]:
    """``(module, value node)`` of the assignment of ``module.name``, following ``from x import name`` re-exports."""
    for node in _tree(module).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return module, node.value
        if isinstance(node, ast.ImportFrom) and depth < 5:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    src = node.module or ""
                    if node.level:  # relative import
                        pkg = module.split(".")
                        is_pkg = _source_file(module).endswith("__init__.py")
                        pkg = pkg[: len(pkg) - node.level + (1 if is_pkg else 0)]
                        src = ".".join(pkg + ([node.module] if node.module else []))
                    return _definition(src, alias.name, depth + 1)
    raise KeyError(f"{module}.{name}")


def _literal(module: str, name: str) -> tuple | None:
    """The values of ``module.name`` when it is a ``Literal[...]`` alias (a choice type), else None."""
    try:
        _, node = _definition(module, name)
    except (KeyError, OSError, AttributeError):
        return None
    if not (isinstance(node, ast.Subscript) and getattr(node.value, "id", "") == "Literal"):
        return None
    elts = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    return tuple(ast.literal_eval(e) for e in elts)


def _constant(module: str, name: str):
    """The literal value of ``module.name`` (``get_args(Alias)`` of a ``Literal`` alias: its values)."""
    where, node = _definition(module, name)
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "get_args" and len(node.args) == 1:
        values = _literal(where, getattr(node.args[0], "id", ""))
        if values is not None:
            return values
    return ast.literal_eval(node)


def _text(node: ast.expr | None, module: str) -> str:
    """A help string: a literal, an implicit concatenation or an f-string over module-level constants."""
    if node is None:
        return ""
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr):
        out = []
        for part in node.values:
            if isinstance(part, ast.Constant):
                out.append(str(part.value))
                continue
            names = {n.id for n in ast.walk(part.value) if isinstance(n, ast.Name)}
            try:
                env = {n: _constant(module, n) for n in names}
                out.append(format(eval(compile(ast.Expression(part.value), "<help>", "eval"), {}, env)))
            except (KeyError, ValueError, SyntaxError, TypeError, NameError):
                out.append("{" + ast.unparse(part.value) + "}")
        return "".join(out)
    return ast.unparse(node)


def _value(node: ast.expr, module: str) -> str:
    """A default as its value (``list(DEFAULT_LORA_TARGETS)`` -> the list), else as written."""
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} - {"list", "tuple", "dict"}
    try:
        env = {n: _constant(module, n) for n in names}
        return repr(eval(compile(ast.Expression(node), "<help>", "eval"), {"list": list, "tuple": tuple}, env))
    except (KeyError, ValueError, SyntaxError, TypeError, NameError):
        return ast.unparse(node)


def class_options(module: str, cls: str) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, help)`` of the fields ``cls`` defines itself, in source order."""
    node = next(n for n in _tree(module).body if isinstance(n, ast.ClassDef) and n.name == cls)
    out = []
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        default, help_ = "", ""
        call = stmt.value
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "field":
            kw = {k.arg: k.value for k in call.keywords}
            if kw.get("init") is not None and isinstance(kw["init"], ast.Constant) and kw["init"].value is False:
                continue
            if "default" in kw:
                default = _value(kw["default"], module)
            elif "default_factory" in kw:
                f = kw["default_factory"]
                default = _value(f.body if isinstance(f, ast.Lambda) else f, module)
            meta = kw.get("metadata")
            if isinstance(meta, ast.Dict):
                for k, v in zip(meta.keys, meta.values):
                    if isinstance(k, ast.Constant) and k.value == "help":
                        help_ = _text(v, module)
        elif call is not None:
            default = ast.unparse(call)
        annotation = ast.unparse(stmt.annotation)
        choices = _literal(module, annotation.removesuffix(" | None"))
        if choices is not None:  # a Literal alias: its values, as argparse shows choices
            annotation = "{" + ",".join(map(str, choices)) + "}"
        out.append((stmt.target.id, annotation, default, " ".join(help_.split())))
    return out


def _metavar(annotation: str) -> str:
    if annotation.startswith("{"):  # choices
        return annotation
    a = annotation.replace(" ", "")
    for word, meta in (("bool", "BOOL"), ("int", "INT"), ("float", "FLOAT"), ("list", "LIST"), ("dict", "MAPPING")):
        if a.startswith(word) or f"|{word}" in a:
            return meta
    return "STR"


def _line(name: str, annotation: str, default: str, help_: str, max_lines: int | None = None) -> str:
    head = f"  --{name} {_metavar(annotation)}"
    tail = help_ + (f" (default: {default})" if default not in ("", "None") else "")
    body = textwrap.wrap(tail, 118 - 36) or [""]
    if max_lines and len(body) > max_lines:  # a long inherited text: its start (--help-all has it whole)
        body = body[: max_lines - 1] + [textwrap.shorten(" ".join(body[max_lines - 1 :]), 118 - 36, placeholder=" ...")]
    first = f"{head:<36}{body[0]}" if len(head) < 36 else f"{head}\n{'':<36}{body[0]}"
    return "\n".join([first] + [f"{'':<36}{b}" for b in body[1:]])


def stage_help(stage: str) -> str:
    """The short help of ``refiner-rl <stage>``."""
    groups = GROUPS[stage]
    own_module, own_cls = groups[-1][1:]
    doc = ast.get_docstring(
        next(n for n in _tree(own_module).body if isinstance(n, ast.ClassDef) and n.name == own_cls)
    )
    lines = [
        f"usage: refiner-rl {stage} --config RECIPE.yaml [--OPTION VALUE ...] [--debug]",
        f"       accelerate launch [ACCELERATE OPTIONS] -m refiner_rl {stage} --config RECIPE.yaml [...]",
        "",
        (doc or "").splitlines()[0],
        "",
        "  --config PATH                     the recipe (YAML); options on the command line override its values",
        "  --debug                           show the traceback of an input error (otherwise one line, exit code 2)",
        "  --help-all                        every option, including all inherited Trainer options (slow)",
    ]
    shown = {"config"}
    for title, module, cls in groups:
        lines += ["", f"{title} options:"]
        for name, ann, default, help_ in class_options(module, cls):
            if name not in shown:
                shown.add(name)
                lines.append(_line(name, ann, default, help_))
    lines += ["", "common Trainer options (see --help-all for the others):"]
    lines.append(_line("resume_from_checkpoint", "str", "", RESUME_HELP))
    for name, (module, cls) in COMMON + (COMMON_GRPO if stage == "grpo" else []):
        if name in shown:
            continue
        found = [o for o in _inherited(module, cls) if o[0] == name]
        if found:
            shown.add(name)
            lines.append(_line(*found[0], max_lines=3))
    return "\n".join(lines)


def _inherited(module: str, cls: str) -> list[tuple[str, str, str, str]]:
    try:
        return class_options(module, cls)
    except (OSError, StopIteration, SyntaxError, AttributeError, TypeError):
        return []  # a changed upstream layout loses these lines of the short help, never the help itself
