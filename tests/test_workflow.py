"""Structural rendering of workflow templates, their checks, and the demo workflows."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from instances.workflow import (
    Workflow,
    bindings_path,
    check_against_object_info,
    load_workflow,
    render,
)
from statemachine.errors import BadConfig

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "workflows" / "demo"
OBJECT_INFO = REPO / "instances" / "data" / "object_info.json"

TEMPLATE: dict[str, Any] = {
    "3": {"class_type": "KSampler",
          "inputs": {"seed": 1, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
                     "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                     "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512,
                                                       "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "POS", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "NEG", "clip": ["4", 1]}},
    "9": {"class_type": "ImageAddNoise", "inputs": {"image": ["12", 0], "seed": 2,
                                                    "strength": 0.5}},
    "12": {"class_type": "LoadImage", "inputs": {"image": "ref.png"}},
}
BINDINGS = {"positive": "6.inputs.text", "negative": "7.inputs.text",
            "seed": ["3.inputs.seed", "9.inputs.seed"]}
PARAMS = {"positive": "a cat", "negative": "blurry", "seed": 42}

HOSTILE = [
    'He said "hi" \\ and left',
    "{{ braces }} {0} %s %(x)s $HOME ${x}",
    "line one\nline two\r\n\ttabbed",
    '{"3": {"class_type": "Evil", "inputs": {}}}',
    '"], "9": {"class_type": "X"}, "x": ["',
    "ünïcödé 日本語 🎬 \u202e right-to-left \u2028 separator",
    "[\"4\", 0]",
]

SAMPLE_PARAMS: dict[str, Any] = {
    "name": "sunset_beach", "positive": HOSTILE[0], "negative": HOSTILE[3],
    "seed": 2**64 - 1, "width": 832, "height": 480, "chunk": 2, "chunks": 3,
    "start_frame": 101, "frames": 101, "latent_path": "b0001/latents/H2.latent",
    "ref_image_path": "b0001/ref/L1.png", "prev_ref_image_path": None,
    "chunk_video_path": "b0001/chunks/L2.mp4", "combined_path": "b0001/combined/C2.mp4",
    "prev_combined_path": "b0001/combined/C1.mp4", "final_path": "b0001/sunset_beach.mp4",
    "output_prefix": "comfy-dual/b0001/L2",
}


def _links(graph: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return {(n, k): v for n, node in graph.items() for k, v in node["inputs"].items()
            if isinstance(v, list)}


def test_render_sets_values_on_a_deep_copy() -> None:
    before = copy.deepcopy(TEMPLATE)
    graph = render(TEMPLATE, BINDINGS, PARAMS)
    assert before == TEMPLATE
    assert graph["6"]["inputs"]["text"] == "a cat"
    assert graph["7"]["inputs"]["text"] == "blurry"
    assert graph["3"]["inputs"]["seed"] == 42 and graph["9"]["inputs"]["seed"] == 42
    graph["3"]["inputs"]["steps"] = 99
    assert TEMPLATE["3"]["inputs"]["steps"] == 20


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_prompt_lands_verbatim_in_one_input(text: str) -> None:
    graph = render(TEMPLATE, BINDINGS, {**PARAMS, "positive": text})
    plain = render(TEMPLATE, BINDINGS, PARAMS)
    assert graph["6"]["inputs"]["text"] == text
    assert graph.keys() == TEMPLATE.keys()
    assert _links(graph) == _links(TEMPLATE)
    changed = [(n, k) for n, node in graph.items() for k, v in node["inputs"].items()
               if v != plain[n]["inputs"][k]]
    assert changed == [("6", "text")]
    assert json.loads(json.dumps(graph))["6"]["inputs"]["text"] == text


def test_drop_when_none_deletes_node_and_input() -> None:
    bindings = {**BINDINGS, "ref_image_path": "12.inputs.image"}
    drops = {"ref_image_path": ["12", "9.inputs.image"]}
    with_ref = render(TEMPLATE, bindings, {**PARAMS, "ref_image_path": "r.png"},
                      drop_when_none=drops)
    assert with_ref["12"]["inputs"]["image"] == "r.png"
    assert with_ref["9"]["inputs"]["image"] == ["12", 0]
    without = render(TEMPLATE, bindings, {**PARAMS, "ref_image_path": None},
                     drop_when_none=drops)
    assert "12" not in without
    assert "image" not in without["9"]["inputs"]
    assert without["9"]["inputs"]["seed"] == 42


def test_dropping_a_node_that_is_still_linked_is_an_error() -> None:
    with pytest.raises(BadConfig, match=r"9\.inputs\.image links to node '12'"):
        render(TEMPLATE, BINDINGS, {**PARAMS, "ref": None}, drop_when_none={"ref": ["12"]},
               template_name="low")


def test_none_without_drop_rule_is_an_error() -> None:
    with pytest.raises(BadConfig, match=r"'seed' is None.*no \[drop_when_none\] rule"):
        render(TEMPLATE, BINDINGS, {**PARAMS, "seed": None})


def test_missing_param_and_non_scalar_value_are_errors() -> None:
    with pytest.raises(BadConfig, match=r"does not have: \['negative'\]"):
        render(TEMPLATE, BINDINGS, {"positive": "a", "seed": 1})
    with pytest.raises(BadConfig, match="'positive' is a list"):
        render(TEMPLATE, BINDINGS, {**PARAMS, "positive": ["4", 0]})


@pytest.mark.parametrize(("path", "message"), [
    ("66.inputs.text", "workflow 'high': path '66.inputs.text': no node '66'"),
    ("6.inputs.txt", "path '6.inputs.txt': node '6' \\(CLIPTextEncode\\) has no input 'txt'"),
    ("6.text", "bad node path '6.text'"),
    ("6", "names a whole node"),
])
def test_bad_paths_name_template_path_and_missing_part(path: str, message: str) -> None:
    with pytest.raises(BadConfig, match=message):
        render(TEMPLATE, {"positive": path}, PARAMS, template_name="high")


def _write(tmp_path: Path, toml: str, template: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(template or TEMPLATE))
    bindings_path(path).write_text(toml)
    return path


def test_load_workflow_reads_sidecar(tmp_path: Path) -> None:
    path = _write(tmp_path, '[bind]\npositive = "6.inputs.text"\n'
                            'seed = ["3.inputs.seed", "9.inputs.seed"]\n'
                            '[drop_when_none]\nseed = "9.inputs.seed"\n')
    wf = load_workflow(path)
    assert wf == Workflow("wf", TEMPLATE, {"positive": "6.inputs.text",
                                           "seed": ("3.inputs.seed", "9.inputs.seed")},
                          {"seed": ("9.inputs.seed",)})
    graph = wf.render({"positive": "x", "seed": None})
    assert "seed" not in graph["9"]["inputs"] and graph["3"]["inputs"]["seed"] == 1


@pytest.mark.parametrize(("toml", "message"), [
    ('[bind]\npositive = "6.inputs.nope"\n', "no input 'nope'"),
    ('[bind]\npositive = 3\n', "bind.positive must be a path string"),
    ('[bindings]\npositive = "6.inputs.text"\n', "unknown tables \\['bindings'\\]"),
    ('[bind\n', "cannot read it"),
    ('[drop_when_none]\nref = ["44"]\n', "no node '44'"),
])
def test_load_workflow_rejects_bad_bindings_at_load(tmp_path: Path, toml: str,
                                                    message: str) -> None:
    with pytest.raises(BadConfig, match=message):
        load_workflow(_write(tmp_path, toml))


def test_load_workflow_rejects_non_api_format(tmp_path: Path) -> None:
    with pytest.raises(BadConfig, match="not an API-format graph"):
        load_workflow(_write(tmp_path, "", {"nodes": [], "links": []}))
    with pytest.raises(BadConfig, match="cannot read it"):
        load_workflow(tmp_path / "absent.json")


@pytest.fixture(scope="module")
def object_info() -> dict[str, Any]:
    return json.loads(OBJECT_INFO.read_text())


def test_check_reports_problems_a_person_can_act_on(object_info: dict[str, Any]) -> None:
    template = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 64,
                                                     "color": 0}},
        "2": {"class_type": "NoSuchNode", "inputs": {}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["99", 0],
                                                    "filename_prefix": 5}},
        "4": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "width": 8,
                                                     "height": 8, "crop": "disabled",
                                                     "upscale_method": "sideways"}},
    }
    bindings = {"width": "1.inputs.width", "size": "1.inputs.size", "x": "7.inputs.y"}
    problems = check_against_object_info(template, object_info, template_name="t",
                                         server="gpu0", bindings=bindings)
    assert problems == [
        "workflow 't' on gpu0: node 1 (EmptyImage): required input 'batch_size' is missing",
        "workflow 't' on gpu0: node 2: unknown class_type 'NoSuchNode' "
        "(custom node not installed?)",
        "workflow 't' on gpu0: node 3 (SaveImage): input 'images' links to node '99', which "
        "is not in the graph",
        "workflow 't' on gpu0: node 3 (SaveImage): filename_prefix=5 is not a STRING",
        "workflow 't' on gpu0: node 4 (ImageScale): upscale_method='sideways' is not one of "
        "['nearest-exact', 'bilinear', 'area', 'bicubic', 'lanczos']",
        "workflow 't' on gpu0: 'size' is bound to '1.inputs.size', but EmptyImage declares "
        "no input 'size'",
        "workflow 't' on gpu0: 'x' is bound to '7.inputs.y', but there is no node '7'",
    ]


def test_check_flags_out_of_range_literals_but_not_bound_ones(object_info: dict[str, Any]
                                                              ) -> None:
    template = {"1": {"class_type": "EmptyImage",
                      "inputs": {"width": 0, "height": 99999, "batch_size": 1, "color": 0}},
                "2": {"class_type": "SaveImage",
                      "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    problems = check_against_object_info(template, object_info, template_name="t",
                                         server="s", bindings={"w": "1.inputs.width"})
    assert problems == ["workflow 't' on s: node 1 (EmptyImage): height=99999 is above the "
                        "maximum 16384"]


@pytest.mark.parametrize("name", ["high", "low", "combine"])
def test_demo_workflows_render_and_pass_the_server_checks(name: str,
                                                          object_info: dict[str, Any]) -> None:
    wf = load_workflow(DEMO / f"{name}.json")
    assert wf.check(object_info, server="stock") == []
    graph = wf.render(SAMPLE_PARAMS)
    assert check_against_object_info(graph, object_info, template_name=name,
                                     server="stock") == []
    prefixes = [n["inputs"]["filename_prefix"] for n in graph.values()
                if "filename_prefix" in n["inputs"]]
    assert prefixes and set(prefixes) == {SAMPLE_PARAMS["output_prefix"]}


def test_demo_low_varies_with_seed_and_chunk() -> None:
    wf = load_workflow(DEMO / "low.json")
    base = wf.render(SAMPLE_PARAMS)
    assert base != wf.render({**SAMPLE_PARAMS, "seed": 7})
    assert base != wf.render({**SAMPLE_PARAMS, "chunk": 3})
