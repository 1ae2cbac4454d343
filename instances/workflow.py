"""Structural rendering of ComfyUI API-format workflow templates.

A template is the plain JSON graph ComfyUI's "Export (API)" writes: ``{node_id:
{"class_type": ..., "inputs": {...}}}``. A sidecar ``<name>.bindings.toml`` says which job
parameter goes into which node input::

    [bind]
    positive = "6.inputs.text"
    seed = ["3.inputs.seed", "9.inputs.noise_seed"]

    [drop_when_none]
    ref_image_path = ["12", "9.inputs.image"]   # "12": the whole node; else one input

    [set_when_none.prev_combined_path]          # rewire what a dropped node fed
    "8.inputs.images" = ["2", 0]

    [params]                                    # values the job does not carry
    model = "wan2.2_high_noise_14B.safetensors" # bind it like any other parameter

    [produces]                                  # files a job must write: name ->
    latent_path = "11"                          # the output node that writes it

Values are set by walking the dict (never by string substitution), so prompt text with
quotes, braces or newlines cannot change the graph. There are no value transforms: bind a
parameter only to an input whose range holds it (a 64-bit seed to a 64-bit seed input).

``[produces]``: a job whose outputs lack one of these files fails (ComfyUI runs the valid
part of a partly invalid graph and calls that a success). A name that is also one of the
planner's artifact parameters is how another job finds the file: producer and reader get
the same planned path (``latent_path`` of HIGH(k) equals that of LOW(k)), and
``instances/artifacts.py`` replaces the reader's bound parameter with the file the
producer's node reported (ComfyUI adds a counter to every file name).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from statemachine.errors import BadConfig

Bindings = Mapping[str, str | Sequence[str]]
DropRules = Mapping[str, Sequence[str]]
SetRules = Mapping[str, Mapping[str, Any]]  # param -> {node input path: value or link}

_SCALARS = (str, int, float, bool)


@dataclass(frozen=True, slots=True)
class NodePath:
    """``"12"`` (a whole node) or ``"12.inputs.image"`` (one input of a node)."""

    node: str
    input: str | None

    @classmethod
    def parse(cls, text: str) -> NodePath:
        parts = text.split(".", 2)
        if len(parts) == 1 and parts[0]:
            return cls(parts[0], None)
        if len(parts) == 3 and parts[0] and parts[1] == "inputs" and parts[2]:
            return cls(parts[0], parts[2])
        raise BadConfig(f"bad node path {text!r}: write 'NODE_ID' or 'NODE_ID.inputs.NAME'")

    def __str__(self) -> str:
        return self.node if self.input is None else f"{self.node}.inputs.{self.input}"


def _paths(spec: str | Sequence[str]) -> list[NodePath]:
    return [NodePath.parse(p) for p in ([spec] if isinstance(spec, str) else spec)]


def _locate(graph: Mapping[str, Any], path: NodePath, template_name: str) -> dict[str, Any]:
    """The inputs dict (or node dict) ``path`` points into; BadConfig naming what is missing."""
    node = graph.get(path.node)
    if not isinstance(node, dict):
        raise BadConfig(f"workflow {template_name!r}: path {str(path)!r}: "
                        f"no node {path.node!r} in the template")
    if path.input is None:
        return node
    inputs = node.get("inputs")
    if not isinstance(inputs, dict) or path.input not in inputs:
        raise BadConfig(f"workflow {template_name!r}: path {str(path)!r}: node {path.node!r} "
                        f"({node.get('class_type')}) has no input {path.input!r}")
    return inputs


def _set_target(graph: Mapping[str, Any], path: NodePath, template_name: str
                ) -> tuple[dict[str, Any], str]:
    """The inputs dict a bound value goes into, and the input's name."""
    if path.input is None:
        raise BadConfig(f"workflow {template_name!r}: binding path {str(path)!r} names a "
                        "whole node; a value can only go into 'NODE_ID.inputs.NAME'")
    return _locate(graph, path, template_name), path.input


def _set(graph: dict[str, Any], path: NodePath, value: Any, template_name: str) -> None:
    inputs, name = _set_target(graph, path, template_name)
    inputs[name] = value


def _delete(graph: dict[str, Any], path: NodePath, template_name: str) -> None:
    _locate(graph, path, template_name)
    if path.input is None:
        del graph[path.node]
    else:
        del graph[path.node]["inputs"][path.input]


def _links(graph: Mapping[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(node, input, linked node) for every input that is a link ``[node_id, output]``."""
    for node_id, node in graph.items():
        for name, value in node.get("inputs", {}).items():
            if is_link(value):
                yield node_id, name, str(value[0])


def is_link(value: Any) -> bool:
    """ComfyUI's API format marks a link as ``[source_node_id, output_index]``."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str | int)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _check_no_dangling(graph: Mapping[str, Any], removed: set[str], template_name: str
                       ) -> None:
    for node_id, name, source in _links(graph):
        if source in removed:
            raise BadConfig(f"workflow {template_name!r}: input {node_id}.inputs.{name} links "
                            f"to node {source!r}, which drop_when_none removed; drop that "
                            "input too")


def render(template: Mapping[str, Any], bindings: Bindings, params: Mapping[str, Any], *,
           drop_when_none: DropRules | None = None, set_when_none: SetRules | None = None,
           template_name: str = "<template>") -> dict[str, Any]:
    """A deep copy of ``template`` with every bound parameter set at its node input paths.

    A parameter that is None first deletes the paths ``drop_when_none`` names for it and
    sets the inputs ``set_when_none`` names (so no value lands in a node about to go, and
    what a dropped node fed can be rewired); a None without such a rule, a parameter the
    job lacks or a non-scalar value raises BadConfig.
    """
    drops, sets = drop_when_none or {}, set_when_none or {}
    named = sorted(bindings.keys() | drops.keys() | sets.keys())
    missing = [p for p in named if p not in params]
    if missing:
        raise BadConfig(f"workflow {template_name!r}: the bindings name parameters the job "
                        f"does not have: {missing}")
    graph = _copy(template)
    removed: set[str] = set()
    for param in named:
        if params[param] is None:
            removed |= _apply_none(graph, param, drops, sets, template_name)
    for param, spec in bindings.items():
        if params[param] is not None:
            value = _scalar(params[param], param, template_name)
            for path in _paths(spec):
                _set(graph, path, value, template_name)
    _check_no_dangling(graph, removed, template_name)
    return graph


def _copy(data: Any) -> Any:
    """A deep copy of JSON data (templates are checked to be that when loaded): orjson's
    round trip takes a seventh of ``copy.deepcopy``'s time, on the path to every POST."""
    return orjson.loads(orjson.dumps(data))


def _scalar(value: Any, param: str, template_name: str) -> Any:
    """Only scalars are bound: a list value would read as a link and rewire the graph."""
    if not isinstance(value, _SCALARS):
        raise BadConfig(f"workflow {template_name!r}: parameter {param!r} is a "
                        f"{type(value).__name__}; only str/int/float/bool can be bound")
    return value


def _apply_none(graph: dict[str, Any], param: str, drops: DropRules, sets: SetRules,
                template_name: str) -> set[str]:
    """Apply the rules for a None ``param``; returns the ids of whole nodes removed."""
    if param not in drops and param not in sets:
        raise BadConfig(f"workflow {template_name!r}: parameter {param!r} is None and the "
                        "bindings have no [drop_when_none] or [set_when_none] rule for it")
    paths = _paths(drops.get(param, ()))
    for path in paths:
        _delete(graph, path, template_name)
    for text, value in sets.get(param, {}).items():
        _set(graph, NodePath.parse(text), _copy(value), template_name)
    return {path.node for path in paths if path.input is None}


# --- checking a template against a server's /object_info -------------------------------

# The /object_info of a stock ComfyUI, recorded: what ``--dry-run`` checks workflows against
# when it is given no other, and the node catalog of the simulator.
STOCK_OBJECT_INFO = Path(__file__).resolve().parent / "data" / "object_info.json"


def _declared(info: Mapping[str, Any]) -> dict[str, Any]:
    """Input name -> input spec over the required and optional sections of a node class."""
    sections = info.get("input", {})
    return {**sections.get("optional", {}), **sections.get("required", {})}


def _combo_options(spec: Sequence[Any]) -> list[Any] | None:
    """Allowed values of a COMBO input in either form (``[[...], {}]`` or ``["COMBO", {}]``)."""
    if spec and isinstance(spec[0], list):
        return spec[0]
    if spec and spec[0] == "COMBO" and len(spec) > 1:
        return spec[1].get("options")
    return None


_TYPES = {"INT": (int,), "FLOAT": (int, float), "STRING": (str,), "BOOLEAN": (bool,)}


def _value_problem(name: str, value: Any, spec: Sequence[Any]) -> str | None:
    options = _combo_options(spec)
    if options is not None:
        return None if value in options else f"{name}={value!r} is not one of {options[:8]}"
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    wanted = _TYPES.get(kind)
    if wanted is not None and (not isinstance(value, wanted)
                               or (kind != "BOOLEAN" and isinstance(value, bool))):
        return f"{name}={value!r} is not a {kind}"
    if "min" in opts and value < opts["min"]:
        return f"{name}={value} is below the minimum {opts['min']}"
    if "max" in opts and value > opts["max"]:
        return f"{name}={value} is above the maximum {opts['max']}"
    return None


def _node_problems(graph: Mapping[str, Any], node_id: str, info: Mapping[str, Any],
                   bound: set[str]) -> Iterator[str]:
    inputs = graph[node_id].get("inputs", {})
    declared = _declared(info)
    for name in info.get("input", {}).get("required", {}):
        if name not in inputs:
            yield f"required input {name!r} is missing"
    for name, value in inputs.items():
        if name not in declared or name in bound:
            continue
        if is_link(value):
            if str(value[0]) not in graph:
                yield f"input {name!r} links to node {value[0]!r}, which is not in the graph"
        elif (problem := _value_problem(name, value, declared[name])) is not None:
            yield problem


def _binding_problems(graph: Mapping[str, Any], bindings: Bindings, drops: DropRules,
                      object_info: Mapping[str, Any]) -> Iterator[str]:
    named = [(p, path) for p, spec in bindings.items() for path in _paths(spec)]
    named += [(p, path) for p, spec in drops.items() for path in _paths(spec)]
    for param, path in named:
        node = graph.get(path.node)
        if node is None:
            yield f"{param!r} is bound to {str(path)!r}, but there is no node {path.node!r}"
            continue
        info = object_info.get(node.get("class_type"))
        if path.input is not None and info is not None and path.input not in _declared(info):
            yield (f"{param!r} is bound to {str(path)!r}, but {node['class_type']} declares "
                   f"no input {path.input!r}")


def check_against_object_info(template: Mapping[str, Any], object_info: Mapping[str, Any], *,
                              template_name: str, server: str,
                              bindings: Bindings | None = None,
                              drop_when_none: DropRules | None = None) -> list[str]:
    """Problems a server would reject the graph for, in words a person can act on.

    Checks class types, required inputs, links, literal values (range, COMBO options) of
    inputs that no binding overwrites, and that every bound path is an input the class
    declares. An empty list means the server should accept the rendered graph.
    """
    where = f"workflow {template_name!r} on {server}"
    bindings = bindings or {}
    bound = {path for spec in bindings.values() for path in _paths(spec)}
    problems = []
    for node_id, node in template.items():
        class_type = node.get("class_type")
        info = object_info.get(class_type)
        if info is None:
            problems.append(f"{where}: node {node_id}: unknown class_type {class_type!r} "
                            "(custom node not installed?)")
            continue
        own = {p.input for p in bound if p.node == node_id and p.input is not None}
        problems += [f"{where}: node {node_id} ({class_type}): {problem}"
                     for problem in _node_problems(template, node_id, info, own)]
    problems += [f"{where}: {problem}" for problem in
                 _binding_problems(template, bindings, drop_when_none or {}, object_info)]
    return problems


def _produces_problems(template: Mapping[str, Any], produces: Mapping[str, str],
                       object_info: Mapping[str, Any]) -> Iterator[str]:
    """A produced artifact must come from an output node: only those report files."""
    for artifact, node_id in produces.items():
        class_type = template[node_id].get("class_type")
        info = object_info.get(class_type)
        if info is not None and not info.get("output_node"):
            yield (f"[produces] {artifact} = {node_id!r}, but {class_type} is not an output "
                   "node, so ComfyUI reports no file for it")


# --- workflow files ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workflow:
    """A template with its rules, loaded from ``<name>.json`` + ``<name>.bindings.toml``."""

    name: str
    template: Mapping[str, Any]
    bindings: Bindings
    drop_when_none: DropRules
    set_when_none: SetRules = field(default_factory=dict)
    produces: Mapping[str, str] = field(default_factory=dict)  # file name -> output node
    params: Mapping[str, Any] = field(default_factory=dict)  # defaults; the job's win

    def render(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The graph for one job; the job's parameters win over ``[params]`` values."""
        return render(self.template, self.bindings, {**self.params, **params},
                      drop_when_none=self.drop_when_none, set_when_none=self.set_when_none,
                      template_name=self.name)

    def binds(self, param: str) -> bool:
        return param in self.bindings

    def check(self, object_info: Mapping[str, Any], *, server: str) -> list[str]:
        """Problems of this workflow on a server with this ``/object_info``.

        ``[params]`` values are checked like literals (a model file the server lacks is a
        COMBO miss), job parameters are not (they change per job); rule paths must be
        inputs the classes declare; produced artifacts must come from output nodes.
        """
        fixed = {p: s for p, s in self.bindings.items() if p in self.params}
        template = render(self.template, fixed, self.params, template_name=self.name)
        per_job = {p: s for p, s in self.bindings.items() if p not in self.params}
        rule_paths = _merged(self.drop_when_none,
                             {p: tuple(rules) for p, rules in self.set_when_none.items()},
                             {p: _as_tuple(s) for p, s in fixed.items()})
        problems = check_against_object_info(template, object_info, template_name=self.name,
                                             server=server, bindings=per_job,
                                             drop_when_none=rule_paths)
        where = f"workflow {self.name!r} on {server}"
        return problems + [f"{where}: {problem}" for problem in
                           _produces_problems(self.template, self.produces, object_info)]


def _merged(*tables: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for table in tables:
        for param, paths in table.items():
            out[param] = out.get(param, ()) + tuple(paths)
    return out


def bindings_path(template_path: Path) -> Path:
    """``workflows/demo/high.json`` -> ``workflows/demo/high.bindings.toml``."""
    return template_path.with_name(template_path.stem + ".bindings.toml")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadConfig(f"workflow template {path}: cannot read it: {exc}") from exc
    if not isinstance(graph, dict) or not all(
            isinstance(n, dict) and "class_type" in n for n in graph.values()):
        raise BadConfig(f"workflow template {path}: not an API-format graph "
                        "({node_id: {class_type, inputs}}); export it with 'Export (API)'")
    try:
        orjson.dumps(graph)
    except orjson.JSONEncodeError as exc:  # an integer beyond 64 bits
        raise BadConfig(f"workflow template {path}: cannot be sent as JSON: {exc}") from None
    return graph


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BadConfig(f"workflow bindings {path}: cannot read it: {exc}") from exc


def _table(table: Any, path: Path, key: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise BadConfig(f"workflow bindings {path}: [{key}] must be a table")
    return table


def _string_lists(table: Any, path: Path, key: str) -> dict[str, str | tuple[str, ...]]:
    out: dict[str, str | tuple[str, ...]] = {}
    for param, spec in _table(table, path, key).items():
        if isinstance(spec, list) and spec and all(isinstance(s, str) for s in spec):
            out[param] = tuple(spec)
        elif isinstance(spec, str):
            out[param] = spec
        else:
            raise BadConfig(f"workflow bindings {path}: {key}.{param} must be a path string "
                            "or a non-empty list of them")
    return out


def _set_rules(table: Any, path: Path) -> dict[str, dict[str, Any]]:
    """``[set_when_none.PARAM]`` tables: node input path -> a scalar or a link."""
    rules = {}
    for param, sets in _table(table, path, "set_when_none").items():
        for target, value in _table(sets, path, f"set_when_none.{param}").items():
            if not (is_link(value) or isinstance(value, _SCALARS)):
                raise BadConfig(f"workflow bindings {path}: set_when_none.{param}.{target} "
                                "must be a value or a link [node_id, output_index]")
        rules[param] = dict(sets)
    return rules


def _constants(table: Any, path: Path) -> dict[str, Any]:
    for param, value in _table(table, path, "params").items():
        if not isinstance(value, _SCALARS):
            raise BadConfig(f"workflow bindings {path}: params.{param} must be a string, "
                            "number or boolean")
    return dict(table)


_TABLES = ("bind", "drop_when_none", "set_when_none", "produces", "params")


def load_workflow(path: Path) -> Workflow:
    """Read a template and its sidecar rules; every path they name must be in the template."""
    template = _read_json(path)
    side = bindings_path(path)
    table = _read_toml(side)
    unknown = set(table) - set(_TABLES)
    if unknown:
        raise BadConfig(f"workflow bindings {side}: unknown tables {sorted(unknown)}; "
                        f"expected {', '.join(f'[{t}]' for t in _TABLES)}")
    wf = Workflow(
        path.stem, template, _string_lists(table.get("bind", {}), side, "bind"),
        {k: _as_tuple(v) for k, v in
         _string_lists(table.get("drop_when_none", {}), side, "drop_when_none").items()},
        _set_rules(table.get("set_when_none", {}), side),
        _node_ids(table.get("produces", {}), side),
        _constants(table.get("params", {}), side))
    _check_paths(wf)
    return wf


def _node_ids(table: Any, path: Path) -> dict[str, str]:
    out = {}
    for artifact, node in _string_lists(table, path, "produces").items():
        if not isinstance(node, str) or NodePath.parse(node).input is not None:
            raise BadConfig(f"workflow bindings {path}: produces.{artifact} must be one node "
                            "id (the output node that writes it)")
        out[artifact] = node
    return out


def _check_paths(wf: Workflow) -> None:
    """Fail at load, not at the first job, when a path names no node or input."""
    for spec in wf.bindings.values():
        for node_path in _paths(spec):
            _set_target(wf.template, node_path, wf.name)
    for spec in wf.drop_when_none.values():
        for node_path in _paths(spec):
            _locate(wf.template, node_path, wf.name)
    for rules in wf.set_when_none.values():
        for target, value in rules.items():
            _set_target(wf.template, NodePath.parse(target), wf.name)
            if is_link(value) and str(value[0]) not in wf.template:
                raise BadConfig(f"workflow {wf.name!r}: set_when_none {target} links to node "
                                f"{value[0]!r}, which is not in the template")
    for node in wf.produces.values():
        _locate(wf.template, NodePath(node, None), wf.name)
    unbound = sorted(set(wf.params) - set(wf.bindings))
    if unbound:
        raise BadConfig(f"workflow {wf.name!r}: [params] {unbound} are bound to no input; "
                        "add them to [bind]")


def _as_tuple(spec: str | Sequence[str]) -> tuple[str, ...]:
    return (spec,) if isinstance(spec, str) else tuple(spec)
