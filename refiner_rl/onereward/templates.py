"""Which dimensions each task is judged on, what the judge is shown, and the question it is asked.

OneReward (arXiv 2508.21066) trains one VLM on many mask-guided tasks, each judged along its own dimensions; the
query is ``template(task, dimension, prompt)`` and the prompt goes in only for the text-alignment dimension. The
defaults follow the paper for fill and extend (structure, consistency, text alignment, aesthetics) and removal
(removal quality); the refinement task (``refine``) is this project's: detail fidelity to the reference and
consistency with the draft, with the reference and the draft (``source``) shown to the judge.

A task may show the judge record images besides A and B (``context``: any of ``source``, ``mask``,
``reference``, each labelled, before A and B), and may show A and B each with the record's reference in one image
(``view``: ``separate``, the default, as they are; ``beside``, side by side; ``interleave``, rows alternating, so each
of the vision tower's patches holds the candidate and the reference at the same place: what lets the tiny judge
compare with the reference). Everything is configurable from YAML; a file's entries extend or
replace the defaults::

    template: "Image A and Image B are two results of {task_description}. ..."   # optional
    dimensions:
      sharpness: "sharpness: edges are crisp"          # new dimensions with their descriptions
    tasks:
      refine: {dimensions: [detail_fidelity, draft_consistency, sharpness], context: [reference]}
      deblur: {description: "deblurring: ...", dimensions: [sharpness]}

The judge trainer saves the templates next to the judge (:data:`TEMPLATES_FILE`), and the ``vlm_judge`` reward
reads them from there, so the judge is asked at scoring time exactly what it was trained on.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any

from refiner_rl.errors import ConfigError
from refiner_rl.vlm.questions import DEFAULT_TEMPLATES, DIMENSIONS, TASKS, build_query, check_template

TEMPLATES_FILE = "onereward.json"
CONTEXT_FIELDS = ("source", "mask", "reference")
CONTEXT_LABELS = {"source": "Source", "mask": "Mask", "reference": "Reference"}
VIEWS = ("separate", "beside", "interleave")  # how images A and B are shown (module docstring)
TASK_DIMENSIONS = {
    "fill": ["structure", "consistency", "text_alignment", "aesthetics"],
    "extend": ["structure", "consistency", "text_alignment", "aesthetics"],
    "removal": ["removal_quality"],
    "refine": ["detail_fidelity", "draft_consistency"],
}
TASK_CONTEXT = {"refine": ["reference", "source"]}


def shown_fields(context: list[str], view: str) -> list[str]:
    """The record images a question shows besides A and B: the ``context`` fields, and the reference where the
    ``view`` shows A and B with it."""
    return list(context) + (["reference"] if view != "separate" and "reference" not in context else [])


@dataclass
class JudgeTemplates:
    """Tasks (description, dimensions, context images), dimension descriptions and the pairwise question."""

    tasks: dict[str, dict] = field(default_factory=dict)
    dimensions: dict[str, str] = field(default_factory=lambda: dict(DIMENSIONS))
    template: str = DEFAULT_TEMPLATES["pairwise"]
    include_prompt: str = "auto"
    # settings saved with a trained judge (yes_words, no_words, prob); not part of the templates
    extra: dict = field(default_factory=dict)

    @classmethod
    def default(cls) -> JudgeTemplates:
        tasks = {
            name: {"description": TASKS[name], "dimensions": list(dims), "context": list(TASK_CONTEXT.get(name, []))}
            for name, dims in TASK_DIMENSIONS.items()
        }
        return cls(tasks=tasks)

    # -- checks and questions ---------------------------------------------------------------------------
    def check(self, where: str = "templates") -> JudgeTemplates:
        """Raise a :class:`ConfigError` naming ``where`` and the entry at fault; returns ``self``."""
        try:
            check_template(self.template)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from err
        if self.include_prompt not in ("auto", "always", "never"):
            raise ConfigError(f"{where}: include_prompt {self.include_prompt!r}: use auto, always or never")
        if not self.tasks:
            raise ConfigError(f"{where}: no tasks; define at least one under `tasks:`")
        for name, task in self.tasks.items():
            if not task.get("description"):
                raise ConfigError(f"{where}: task {name!r} has no description; add `description:` to it")
            if not task.get("dimensions"):
                raise ConfigError(f"{where}: task {name!r} has no dimensions; list them under `dimensions:`")
            for dim in task["dimensions"]:
                if dim not in self.dimensions:
                    raise ConfigError(
                        f"{where}: task {name!r} names dimension {dim!r}, which has no description; add it under "
                        f"`dimensions:` (known: {', '.join(self.dimensions)})"
                    )
            for item in task.get("context", []):
                if item not in CONTEXT_FIELDS:
                    raise ConfigError(
                        f"{where}: task {name!r} context {item!r}: use any of {', '.join(CONTEXT_FIELDS)}"
                    )
            if task.get("view", "separate") not in VIEWS:
                raise ConfigError(f"{where}: task {name!r} view {task['view']!r}: use one of {', '.join(VIEWS)}")
        return self

    def task_dimensions(self, task: str) -> list[str]:
        return list(self.tasks[task]["dimensions"])

    def context(self, task: str) -> list[str]:
        return list(self.tasks[task].get("context", []))

    def view(self, task: str) -> str:
        """How images A and B are shown: ``separate``, or each with the reference (``beside``, ``interleave``)."""
        return str(self.tasks[task].get("view", "separate"))

    def needs(self, task: str) -> list[str]:
        """The record images the task shows besides A and B (:func:`shown_fields`)."""
        return shown_fields(self.context(task), self.view(task))

    def query(self, task: str, dimension: str, prompt: str = "") -> str:
        """The question for (task, dimension); the prompt goes in only for ``text_alignment`` (``auto``)."""
        return build_query(
            mode="pairwise",
            task=task,
            dimension=dimension,
            prompt=prompt,
            include_prompt=self.include_prompt,
            template=self.template,
            task_description=self.tasks[task]["description"],
            dimension_description=self.dimensions[dimension],
        )

    # -- files ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "template": self.template,
            "include_prompt": self.include_prompt,
            "dimensions": dict(self.dimensions),
            "tasks": copy.deepcopy(self.tasks),
        }

    def save(self, folder: str, **extra: Any) -> str:
        """Write the templates (and ``extra`` judge settings: yes/no words, ``prob``) to ``folder/onereward.json``."""
        path = os.path.join(folder, TEMPLATES_FILE)
        with open(path, "w") as f:
            json.dump({**self.to_dict(), **extra}, f, indent=2)
        return path


def merge_templates(overrides: dict | None, where: str = "templates") -> JudgeTemplates:
    """The defaults extended by ``overrides`` (the YAML form in the module docstring); checked."""
    out = JudgeTemplates.default()
    overrides = dict(overrides or {})
    unknown = set(overrides) - {"template", "include_prompt", "dimensions", "tasks", "yes_words", "no_words", "prob"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; use template, include_prompt, dimensions, tasks"
        )
    if overrides.get("template"):
        out.template = str(overrides["template"])
    if overrides.get("include_prompt"):
        out.include_prompt = str(overrides["include_prompt"])
    out.extra = {k: overrides[k] for k in ("yes_words", "no_words", "prob") if overrides.get(k) is not None}
    out.dimensions.update({str(k): str(v) for k, v in (overrides.get("dimensions") or {}).items()})
    for name, spec in (overrides.get("tasks") or {}).items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: task {name!r} must be a mapping with description/dimensions/context/view")
        bad = set(spec) - {"description", "dimensions", "context", "view"}
        if bad:
            raise ConfigError(
                f"{where}: task {name!r} has unknown key(s) {', '.join(sorted(bad))}; use description, dimensions, "
                "context, view"
            )
        task = out.tasks.setdefault(str(name), {"description": TASKS.get(name, ""), "dimensions": [], "context": []})
        for key in ("description", "dimensions", "context", "view"):
            if key in spec:
                task[key] = str(spec[key]) if key in ("description", "view") else [str(v) for v in spec[key]]
    return out.check(where)


def load_templates(source: str | dict | None) -> JudgeTemplates:
    """Templates from a YAML/JSON file, a judge folder (its :data:`TEMPLATES_FILE`), a dict, or the defaults."""
    if source is None or isinstance(source, dict):
        return merge_templates(source)
    path = os.path.join(source, TEMPLATES_FILE) if os.path.isdir(source) else source
    if not os.path.exists(path):
        raise ConfigError(f"templates file not found: {path}")
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}  # JSON is YAML
    except yaml.YAMLError as err:
        raise ConfigError(f"templates file {path} is not valid YAML/JSON: {' '.join(str(err).split())}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"templates file {path} must hold a mapping (template, dimensions, tasks)")
    return merge_templates(data, where=path)


def judge_settings(path: str | None, explicit: bool = False) -> JudgeTemplates | None:
    """The templates and answer settings saved with a trained judge (``path``: its folder or the file), or ``None``
    when ``path`` has none (a hub id, an untrained model); a :class:`ConfigError` if ``explicit`` and missing."""
    if not path:
        return None
    file = os.path.join(path, TEMPLATES_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        if explicit:
            raise ConfigError(
                f"judge_config: no {TEMPLATES_FILE} at {path}; point it at a judge trained by `refiner-rl reward-model`"
            )
        return None
    return load_templates(file)
