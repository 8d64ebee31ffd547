"""Load every mapping in a folder, compile its templates and FHIRPath, and report all problems at once."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError, TemplateNotFound, TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import ValidationError

from connector.errors import ConfigError, Problem
from connector.mapping.spec import LANGUAGE_PATTERN, MappingSpec, RecipientPath
from connector.mapping.templates import (
    CRM_APPOINTMENT_MESSAGE_NAMES,
    CRM_KEY_NAMES,
    CRM_MESSAGE_NAMES,
    KEY_NAMES,
    MESSAGE_NAMES,
    make_environment,
    referenced_templates,
    undeclared_names,
    vars_used,
)
from connector.yamlfile import YamlDoc, load_yaml, problems_from

Condition = Callable[..., list[Any]]

# A skeletal resource to run each FHIRPath condition once at load time: fhirpathpy reports unknown
# functions only when an expression is evaluated.
_TRIAL_RESOURCE = {"resourceType": "Appointment", "id": "trial", "status": "booked", "participant": []}
_TRIAL_EVENT: dict[str, Any] = {
    "event_id": "trial",
    "event_type": "trial",
    "object_id": None,
    "payload": {},
    "object": {},
}
_TRIAL_CRM_APPOINTMENT: dict[str, Any] = {
    "resourceType": "CrmAppointment",
    "id": "trial",
    "status": "booked",
    "start": "2026-01-01T09:00:00Z",
    **_TRIAL_EVENT,
}


@dataclass(frozen=True)
class Variant:
    """The templates of one language."""

    subject: Template
    text: Template
    html: Template | None


@dataclass(frozen=True)
class Mapping:
    spec: MappingSpec
    path: Path
    variants: dict[str, Variant]  # by language; spec.language is always there
    key: Template
    condition: Condition | None
    recipient: Condition | None = None  # CRM mappings: FHIRPath to the address

    @property
    def name(self) -> str:
        return self.spec.name

    def variant_for(self, languages: list[str]) -> tuple[str, Variant]:
        """The first of the patient's languages we have templates for (exact, then primary subtag)."""
        lowered = {code.lower(): code for code in self.variants}
        for language in languages:
            for candidate in (language.lower(), language.lower().split("-")[0]):
                if candidate in lowered:
                    return lowered[candidate], self.variants[lowered[candidate]]
        return self.spec.language, self.variants[self.spec.language]


class MappingSet:
    """The mappings of one folder, by name."""

    def __init__(self, mappings: Iterable[Mapping]) -> None:
        self._by_name = {m.name: m for m in mappings}

    def __iter__(self) -> Iterator[Mapping]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> Mapping | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def replace(self, fresh: MappingSet) -> None:
        """Use `fresh`'s mappings from now on (a reload). Everything holding this set sees them at once:
        one assignment, between two steps of the event loop."""
        self._by_name = dict(fresh._by_name)


def load_mappings(
    folder: Path,
    source_names: Iterable[str] | None = None,
    appointment_sources: Iterable[str] | None = None,
    handoff_to: str | None = None,
) -> MappingSet:
    """Load `folder/*.yaml`. Raises ConfigError with every problem (file, line, what) in the folder.
    `source_names`: the config's sources (FHIR and CRM), which `trigger.sources` may name;
    `appointment_sources`: the CRM sources with an `appointment:` declaration, the only ones a
    CrmAppointment mapping hears from (not checked when not given); `handoff_to`: the config's
    `handoff.to` (`task` without a section), which a CRM mapping's own `handoff:` needs to be `webhook`."""
    if not folder.is_dir():
        raise ConfigError([Problem(folder, None, "", "mappings folder does not exist")])
    env = make_environment(folder)
    files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
    if not files:
        raise ConfigError([Problem(folder, None, "", "no mapping files (*.yaml) in the mappings folder")])
    mappings: list[Mapping] = []
    problems: list[Problem] = []
    seen: dict[str, Path] = {}
    sources = set(source_names) if source_names is not None else None
    declared = set(appointment_sources) if appointment_sources is not None else None
    for path in files:
        try:
            mapping = _load_one(path, folder, env, sources, declared, handoff_to)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if mapping.name in seen:
            problems.append(
                Problem(path, None, "name", f"mapping name {mapping.name!r} is also used by {seen[mapping.name].name}")
            )
            continue
        seen[mapping.name] = path
        mappings.append(mapping)
    if problems:
        raise ConfigError(problems)
    return MappingSet(mappings)


def _undeclared(spec: MappingSpec, doc: YamlDoc, sources: set[str] | None, declared: set[str]) -> list[Problem]:
    """A CrmAppointment mapping hears only from CRM sources that declare how their events describe an
    appointment (`crm.<name>.appointment`): one naming another source, or left with none, never fires."""
    if spec.trigger.sources is None:
        if declared:
            return []
        return [
            doc.problem(
                ("trigger", "resource"),
                "no crm source in the config has an `appointment:` declaration, so this CrmAppointment mapping "
                'never fires: declare one under crm.<name>.appointment (README, "CRM appointments")',
            )
        ]
    problems = []
    for index, name in enumerate(spec.trigger.sources):
        if name in declared or (sources is not None and name not in sources):
            continue  # declared, or already reported as no source at all
        problems.append(
            doc.problem(
                ("trigger", "sources", index),
                f"source {name!r} has no `appointment:` declaration, so this CrmAppointment mapping never hears "
                f'from it: declare one under crm.{name}.appointment (README, "CRM appointments") or leave '
                f"{name!r} out of trigger.sources",
            )
        )
    return problems


def _load_one(
    path: Path,
    root: Path,
    env: SandboxedEnvironment,
    sources: set[str] | None,
    declared: set[str] | None = None,
    handoff_to: str | None = None,
) -> Mapping:
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise ConfigError([doc.problem((), "a mapping file must be a YAML mapping (key: value)")])
    data = {"name": path.stem, **doc.data}
    try:
        spec = MappingSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(problems_from(exc, doc)) from None

    problems: list[Problem] = []
    key_names, message_names = (CRM_KEY_NAMES, CRM_MESSAGE_NAMES) if spec.is_crm else (KEY_NAMES, MESSAGE_NAMES)
    if spec.is_crm_appointment:
        message_names = CRM_APPOINTMENT_MESSAGE_NAMES
    key = _inline(env, spec.key, doc, ("key",), key_names, problems)
    variants = _variants(spec, env, path, root, doc, problems, message_names)
    trial = _TRIAL_EVENT if spec.is_crm else _TRIAL_CRM_APPOINTMENT if spec.is_crm_appointment else _TRIAL_RESOURCE
    condition = _condition(spec.trigger.condition, doc, problems, trial)
    recipient = (
        _condition(spec.recipient.path, doc, problems, trial, ("recipient", "path"), boolean=False)
        if isinstance(spec.recipient, RecipientPath)
        else None
    )
    for index, name in enumerate(spec.trigger.sources or []):
        if sources is not None and name not in sources:
            problems.append(doc.problem(("trigger", "sources", index), f"no source named {name!r} in the config"))
    if spec.is_crm_appointment and declared is not None:
        problems += _undeclared(spec, doc, sources, declared)
    own = spec.handoff
    if handoff_to == "task" and (spec.is_crm or spec.is_crm_appointment) and own is not None and own.enabled:
        problems.append(
            doc.problem(
                ("handoff",),
                "a CRM mapping is handed off only to a webhook (a Task needs a FHIR source): set the config's "
                "handoff.to: webhook with url and secret, or `handoff: false` here",
            )
        )
    if problems:
        raise ConfigError(problems)
    assert key is not None
    return Mapping(spec=spec, path=path, variants=variants, key=key, condition=condition, recipient=recipient)


def _language_files(folder: Path, name: str) -> dict[str, str]:
    """`reminder.txt` → {"nl": "reminder.nl.txt", ...} for the variants lying beside it."""
    stem, dot, suffix = Path(name).name.partition(".")
    found = {}
    for candidate in folder.glob(f"{stem}.*.{suffix}" if dot else f"{stem}.*"):
        middle = candidate.name[len(stem) + 1 : len(candidate.name) - (len(suffix) + 1 if dot else 0)]
        if re.fullmatch(LANGUAGE_PATTERN, middle):
            found[middle] = str(Path(name).parent / candidate.name)
    return found


def _variants(
    spec: MappingSpec,
    env: SandboxedEnvironment,
    path: Path,
    root: Path,
    doc: YamlDoc,
    problems: list[Problem],
    names: frozenset[str],
) -> dict[str, Variant]:
    """The base templates (in spec.language) and every language variant found beside them."""
    templates = spec.templates
    folder = (path.parent / templates.text).parent
    text_files = {spec.language: templates.text, **_language_files(folder, templates.text)}
    html_files = {spec.language: templates.html, **_language_files(folder, templates.html)} if templates.html else {}
    variants: dict[str, Variant] = {}
    for language, text_name in text_files.items():
        subjects = templates.subject
        if isinstance(subjects, str) and language != spec.language:
            problems.append(
                doc.problem(
                    ("templates", "subject"),
                    f"{text_name} is a {language!r} variant: give "
                    f"the subject per language, e.g. subject: {{{spec.language}: ..., "
                    f"{language}: ...}}",
                )
            )
            continue
        subject_source = subjects if isinstance(subjects, str) else subjects.get(language)
        if subject_source is None:
            problems.append(doc.problem(("templates", "subject"), f"no subject for language {language!r}"))
            continue
        where = ("templates", "subject") if isinstance(subjects, str) else ("templates", "subject", language)
        known = frozenset(spec.vars)
        subject = _inline(env, subject_source, doc, where, names, problems, known)
        text = _file(env, text_name, path, root, doc, ("templates", "text"), problems, names, known)
        html = None
        if templates.html:
            if language not in html_files:
                problems.append(
                    doc.problem(
                        ("templates", "html"),
                        f"{text_name} has no matching HTML variant ({Path(templates.html).stem}.{language}.html)",
                    )
                )
                continue
            html = _file(env, html_files[language], path, root, doc, ("templates", "html"), problems, names, known)
        if subject is not None and text is not None:
            variants[language] = Variant(subject, text, html)
    return variants


def _inline(
    env: SandboxedEnvironment,
    source: str,
    doc: YamlDoc,
    loc: tuple[str, ...],
    allowed: frozenset[str],
    problems: list[Problem],
    known_vars: frozenset[str] | None = None,
) -> Template | None:
    try:
        template = env.from_string(source)
        tree = env.parse(source)  # once for both reads
        unknown = undeclared_names(env, tree) - allowed
        used = vars_used(env, tree)
    except TemplateSyntaxError as exc:
        problems.append(doc.problem(loc, f"template error: {exc.message}"))
        return None
    if unknown:
        problems.append(doc.problem(loc, _unknown_names(unknown, allowed)))
    if known_vars is not None:
        for name in sorted({n for n, _ in used} - known_vars):
            problems.append(doc.problem(loc, _unknown_var(name, known_vars)))
    return template


def _file(
    env: SandboxedEnvironment,
    name: str | None,
    mapping_path: Path,
    root: Path,
    doc: YamlDoc,
    loc: tuple[str, ...],
    problems: list[Problem],
    names: frozenset[str] = MESSAGE_NAMES,
    known_vars: frozenset[str] | None = None,
) -> Template | None:
    assert name is not None
    relative = (mapping_path.parent / name).resolve()
    try:
        template_name = relative.relative_to(root.resolve()).as_posix()
    except ValueError:
        problems.append(doc.problem(loc, f"template {name!r} must be inside the mappings folder"))
        return None
    try:
        template = env.get_template(template_name)
        assert env.loader is not None
        source, _, _ = env.loader.get_source(env, template_name)
        tree = env.parse(source)  # once for the three reads
        unknown = undeclared_names(env, tree) - names
        used = [(relative, var, line) for var, line in vars_used(env, tree)]
        for parent in referenced_templates(env, tree):  # a layout reads the same vars
            parent_source, parent_file, _ = env.loader.get_source(env, parent)
            used += [(Path(parent_file or parent), var, line) for var, line in vars_used(env, parent_source)]
    except TemplateNotFound:
        problems.append(doc.problem(loc, f"template file {name!r} not found next to the mapping"))
        return None
    except TemplateSyntaxError as exc:
        problems.append(Problem(relative, exc.lineno, name, f"template error: {exc.message}"))
        return None
    except TemplateError as exc:
        problems.append(Problem(relative, None, name, f"template error: {exc.message}"))
        return None
    if unknown:
        problems.append(Problem(relative, None, name, _unknown_names(unknown, names)))
    if known_vars is not None:
        for file, var, line in used:
            if var not in known_vars:
                problems.append(Problem(file, line, name, _unknown_var(var, known_vars, doc.path)))
    return template


def _unknown_var(name: str, known: frozenset[str], mapping: Path | None = None) -> str:
    where = f"the `vars:` of {mapping.name}" if mapping is not None else "the mapping's `vars:`"
    listed = ", ".join(sorted(known)) or "none"
    return f"vars.{name} is not in {where} (it would render empty); defined there: {listed}"


def _unknown_names(unknown: set[str], allowed: frozenset[str]) -> str:
    names = ", ".join(repr(n) for n in sorted(unknown))
    return f"unknown variable {names}; templates here can use: {', '.join(sorted(allowed))}"


def _condition(
    expression: str | None,
    doc: YamlDoc,
    problems: list[Problem],
    trial: dict[str, Any],
    loc: tuple[str, ...] = ("trigger", "condition"),
    boolean: bool = True,
) -> Condition | None:
    if not expression:
        return None
    from connector.mapping.fhirpath_syntax import syntax_error  # here: its parser is heavy, start-up is not

    syntax = syntax_error(expression)
    if syntax is not None:
        problems.append(doc.problem(loc, f"FHIRPath does not parse, {syntax}"))
        return None
    try:
        import fhirpathpy  # here, not at start-up: only mappings with conditions need it

        compiled: Condition = fhirpathpy.compile(expression)
        result = compiled(dict(trial))
    except Exception as exc:  # noqa: BLE001 - fhirpathpy raises bare Exception for every parse/eval error
        problems.append(doc.problem(loc, f"FHIRPath error: {exc}"))
        return None
    if boolean and any(not isinstance(item, bool) for item in result):
        problems.append(
            doc.problem(loc, "the condition must give true or false (e.g. add `.exists()` or a comparison)")
        )
        return None
    return compiled
