"""Node catalog and prompt validation of the ComfyUI simulator.

The catalog is the recorded ``/object_info`` of a stock ComfyUI (``STOCK_OBJECT_INFO``).
Validation follows ComfyUI's ``validate_prompt``/``validate_inputs`` step by step so the
400 answers carry the same error types, messages and nesting as the recorded ones.
"""

from __future__ import annotations

import copy
import functools
import json
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from instances.workflow import STOCK_OBJECT_INFO

# (class_type, input) -> kind of file that input names in the input directory.
INPUT_FILE_INPUTS: Mapping[tuple[str, str], str] = {
    ("LoadImage", "image"): "image",
    ("LoadImageMask", "image"): "image",
    ("LoadLatent", "latent"): "latent",
    ("LoadVideo", "file"): "video",
    ("LoadAudio", "audio"): "audio",
}
PRIMITIVES: Mapping[str, Callable[[Any], Any]] = {
    "INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool,
}
LONG_COMBO = 20  # ComfyUI leaves longer option lists out of error reports

Prompt = dict[str, dict[str, Any]]
Reason = dict[str, Any]
FileLister = Callable[[str], list[str]]
FileExists = Callable[[str], bool]


@functools.cache
def _load_object_info() -> dict[str, Any]:
    return json.loads(STOCK_OBJECT_INFO.read_text(encoding="utf-8"))


class NodeCatalog:
    """The node classes a server knows, with input-directory combos listed live."""

    def __init__(self, list_input_files: FileLister) -> None:
        self._info = _load_object_info()
        self._list_input_files = list_input_files

    def knows(self, class_type: str) -> bool:
        return class_type in self._info

    def is_output(self, class_type: str) -> bool:
        return bool(self._info[class_type]["output_node"])

    def return_types(self, class_type: str) -> list[Any]:
        return self._info[class_type]["output"]

    def input_specs(self, class_type: str) -> list[tuple[str, str, list[Any]]]:
        """(name, "required"|"optional", spec) of a class, in declaration order."""
        inputs = self._info[class_type]["input"]
        return [(name, category, spec) for category in ("required", "optional")
                for name, spec in inputs.get(category, {}).items()]

    def default(self, class_type: str, name: str) -> Any:
        for input_name, _, spec in self.input_specs(class_type):
            if input_name == name and len(spec) > 1:
                return spec[1].get("default")
        return None

    def describe(self, class_type: str | None = None) -> dict[str, Any]:
        """``/object_info`` (all classes) or ``/object_info/<class>`` (``{}`` if unknown)."""
        names = list(self._info) if class_type is None else [class_type]
        return {name: self._live(name) for name in names if name in self._info}

    def _live(self, class_type: str) -> dict[str, Any]:
        info = self._info[class_type]
        file_inputs = [(n, k) for (c, n), k in INPUT_FILE_INPUTS.items() if c == class_type]
        if not file_inputs:
            return info
        info = copy.deepcopy(info)
        for name, kind in file_inputs:
            spec = info["input"]["required"][name]
            if spec[0] == "COMBO":
                spec[1]["options"] = self._list_input_files(kind)
            else:
                spec[0] = self._list_input_files(kind)
        return info


@dataclass
class Validation:
    """Outcome of ``validate_prompt``: an error (400) or the outputs to execute."""

    error: dict[str, Any] | None
    good_outputs: list[str] = field(default_factory=list)
    node_errors: dict[str, Any] = field(default_factory=dict)


def _error(kind: str, message: str, details: str, extra_info: dict[str, Any]) -> Reason:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


def _traceback_lines() -> list[str]:
    return traceback.format_stack(limit=3)


def _exception_reason(kind: str, message: str, ex: Exception) -> Reason:
    return _error(kind, message, str(ex), {
        "exception_type": type(ex).__name__,
        "traceback": traceback.format_tb(ex.__traceback__),
    })


def check_structure(prompt: Any) -> None:
    """Raise ``TypeError`` where ComfyUI itself would crash (answered 500, plain text)."""
    if not isinstance(prompt, dict):
        raise TypeError(f"prompt must be an object, not {type(prompt).__name__}")
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or not isinstance(node.get("inputs", {}), dict):
            raise TypeError(f"node {node_id!r} must be an object with an 'inputs' object")


def _class_error(prompt: Prompt, catalog: NodeCatalog) -> Reason | None:
    for node_id, node in prompt.items():
        if "class_type" not in node:
            return _error("invalid_prompt",
                          "Cannot execute because a node is missing the class_type property.",
                          f"Node ID '#{node_id}'", {})
        class_type = node["class_type"]
        if not catalog.knows(class_type):
            return _error("missing_node_type",
                          f"Node '{class_type}' not found. The custom node may not be installed.",
                          f"Node ID '#{node_id}'",
                          {"node_id": node_id, "class_type": class_type, "node_title": class_type})
    return None


def validate_prompt(prompt: Prompt, catalog: NodeCatalog, input_exists: FileExists) -> Validation:
    """Validate an API-format graph the way ComfyUI does before queueing it."""
    class_error = _class_error(prompt, catalog)
    if class_error:
        return Validation(class_error)
    outputs = [n for n, node in prompt.items() if catalog.is_output(node["class_type"])]
    if not outputs:
        return Validation(_error("prompt_no_outputs", "Prompt has no outputs", "", {}))
    checker = _InputChecker(prompt, catalog, input_exists)
    result = Validation(None)
    failures: list[tuple[str, list[Reason]]] = []
    for output in outputs:
        valid, reasons = checker.check_output(output)
        if valid:
            result.good_outputs.append(output)
        else:
            failures.append((output, reasons))
            checker.collect_node_errors(output, result.node_errors)
    if not result.good_outputs:
        result.error = _outputs_failed(failures, result.node_errors)
    return result


def _outputs_failed(failures: list[tuple[str, list[Reason]]],
                    node_errors: dict[str, Any]) -> Reason:
    """The top-level error, in the recorded fork's shape (``extra_info`` nests everything)."""
    reasons = [r for _, rs in failures for r in rs]
    details = "\n".join(f"{r['message']}: {r['details']}" for r in reasons)
    first = reasons[0]["extra_info"] if reasons else {}
    return _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details, {
        "exception_type": first.get("exception_type", "ValidationError"),
        "traceback": first.get("traceback") or _traceback_lines(),
        "node_errors": node_errors,
    })


def _types_match(received: Any, expected: Any) -> bool:
    """ComfyUI's ``validate_node_input``: equal, a ``*`` wildcard, or overlapping unions."""
    if received == expected:
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in expected.split(",")}
    return "*" in got or "*" in want or bool(got & want)


class _InputChecker:
    """``validate_inputs`` over one prompt, memoised per node like ComfyUI's ``validated``."""

    def __init__(self, prompt: Prompt, catalog: NodeCatalog, input_exists: FileExists) -> None:
        self._prompt = prompt
        self._catalog = catalog
        self._input_exists = input_exists
        self._validated: dict[str, tuple[bool, list[Reason]]] = {}

    def check_output(self, output: str) -> tuple[bool, list[Reason]]:
        try:
            return self._check_node(output)
        except Exception as ex:  # a broken link: ComfyUI reports whatever was raised
            reasons = [_exception_reason("exception_during_validation",
                                         "Exception when validating node", ex)]
            self._validated[output] = (False, reasons)
            return False, reasons

    def collect_node_errors(self, output: str, node_errors: dict[str, Any]) -> None:
        """Report every invalid node with reasons of its own, naming ``output`` as dependent."""
        for node_id, (valid, reasons) in self._validated.items():
            if valid or not reasons:
                continue
            entry = node_errors.setdefault(node_id, {
                "errors": reasons, "dependent_outputs": [],
                "class_type": self._prompt[node_id]["class_type"]})
            entry["dependent_outputs"].append(output)

    def _check_node(self, node_id: str) -> tuple[bool, list[Reason]]:
        if node_id in self._validated:
            return self._validated[node_id]
        node = self._prompt[node_id]
        reasons: list[Reason] = []
        upstream_valid = True
        for name, category, spec in self._catalog.input_specs(node["class_type"]):
            if name not in node["inputs"]:
                if category == "required":
                    reasons.append(_error("required_input_missing", "Required input is missing",
                                          name, {"input_name": name}))
                continue
            value = node["inputs"][name]
            if isinstance(value, list):
                reason, linked_valid = self._check_link(name, spec, value)
                upstream_valid = upstream_valid and linked_valid
            else:
                reason = self._check_value(node["class_type"], name, spec, value)
            if reason:
                reasons.append(reason)
        result = (upstream_valid and not reasons, reasons)
        self._validated[node_id] = result
        return result

    def _check_link(self, name: str, spec: list[Any],
                    link: list[Any]) -> tuple[Reason | None, bool]:
        """(reason, upstream valid); a missing node or slot raises, as in ComfyUI."""
        config = [spec[0], spec[1] if len(spec) > 1 else {}]
        if len(link) != 2:
            return _error("bad_linked_input",
                          "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                          name, {"input_name": name, "input_config": config,
                                 "received_value": link}), True
        source_id, slot = link
        received = self._catalog.return_types(self._prompt[source_id]["class_type"])[slot]
        if not _types_match(received, spec[0]):
            return _error("return_type_mismatch", "Return type mismatch between linked nodes",
                          f"{name}, received_type({received}) mismatch input_type({spec[0]})",
                          {"input_name": name, "input_config": config,
                           "received_type": received, "linked_node": link}), True
        return None, self._check_node(str(source_id))[0]

    def _check_value(self, class_type: str, name: str, spec: list[Any],
                     value: Any) -> Reason | None:
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        config = [kind, options]
        if isinstance(value, dict) and "__value__" in value:
            value = value["__value__"]
        if isinstance(kind, str) and kind in PRIMITIVES:
            try:
                value = PRIMITIVES[kind](value)
            except (TypeError, ValueError) as ex:
                return _error("invalid_input_type",
                              f"Failed to convert an input value to a {kind} value",
                              f"{name}, {value}, {ex}",
                              {"input_name": name, "input_config": config,
                               "received_value": value, "exception_message": str(ex)})
        file_kind = INPUT_FILE_INPUTS.get((class_type, name))
        if file_kind:
            return self._check_input_file(name, file_kind, value)
        return _range_error(name, config, value) or _combo_error(name, config, value)

    def _check_input_file(self, name: str, file_kind: str, value: Any) -> Reason | None:
        if self._input_exists(str(value)):
            return None
        return _error("custom_validation_failed", "Custom validation failed for node",
                      f"{name} - Invalid {file_kind} file: {value}", {"input_name": name})


def _range_error(name: str, config: list[Any], value: Any) -> Reason | None:
    options = config[1]
    for bound, kind, word in (("min", "value_smaller_than_min", "smaller than min"),
                              ("max", "value_bigger_than_max", "bigger than max")):
        if bound not in options or isinstance(value, (str, list, dict)) or value is None:
            continue
        limit = options[bound]
        if (value < limit) if bound == "min" else (value > limit):
            return _error(kind, f"Value {value} {word} of {limit}", name,
                          {"input_name": name, "input_config": config, "received_value": value})
    return None


def _combo_error(name: str, config: list[Any], value: Any) -> Reason | None:
    kind, options = config
    if isinstance(kind, list):
        choices = kind
    elif kind == "COMBO":
        choices = options.get("options", [])
    else:
        return None
    wanted = value if options.get("multiselect") and isinstance(value, list) else [value]
    if all(v in choices for v in wanted):
        return None
    long_list = len(choices) > LONG_COMBO
    listing = f"(list of length {len(choices)})" if long_list else str(choices)
    return _error("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {listing}",
                  {"input_name": name, "input_config": None if long_list else config,
                   "received_value": value})


def execution_order(prompt: Prompt, outputs: list[str]) -> list[str]:
    """Nodes the outputs depend on, each after its inputs (depth first, input order)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen:
            return
        seen.add(node_id)
        for value in prompt[node_id]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
                visit(str(value[0]))
        order.append(node_id)

    for output in outputs:
        visit(output)
    return order
