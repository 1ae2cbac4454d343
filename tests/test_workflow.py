"""Structural rendering of workflow templates, their checks, and the demo workflows."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

import config
import daemon
from instances.client import ComfyClient
from instances.workflow import (
    STOCK_OBJECT_INFO,
    Workflow,
    bindings_path,
    check_against_object_info,
    load_workflow,
    render,
)
from simulator import start_simulator
from statemachine.errors import BadConfig

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "workflows" / "demo"

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


def test_none_without_a_rule_is_an_error() -> None:
    with pytest.raises(BadConfig, match=r"'seed' is None.*no \[drop_when_none\] or "
                                        r"\[set_when_none\] rule"):
        render(TEMPLATE, BINDINGS, {**PARAMS, "seed": None})


def test_set_when_none_rewires_what_a_dropped_node_fed() -> None:
    """A link and a value are set only when the parameter is None (structure only here)."""
    bindings = {**BINDINGS, "ref": "12.inputs.image"}
    drops = {"ref": ["12"]}
    sets = {"ref": {"9.inputs.image": ["5", 0], "9.inputs.strength": 0.0}}
    without = render(TEMPLATE, bindings, {**PARAMS, "ref": None}, drop_when_none=drops,
                     set_when_none=sets)
    assert "12" not in without
    assert without["9"]["inputs"] == {"image": ["5", 0], "seed": 42, "strength": 0.0}
    kept = render(TEMPLATE, bindings, {**PARAMS, "ref": "r.png"}, drop_when_none=drops,
                  set_when_none=sets)
    assert kept["9"]["inputs"]["image"] == ["12", 0] and kept["12"]["inputs"]["image"] == "r.png"
    with pytest.raises(BadConfig, match=r"9\.inputs\.image links to node '12'"):
        render(TEMPLATE, bindings, {**PARAMS, "ref": None}, drop_when_none=drops,
               set_when_none={"ref": {"9.inputs.strength": 0.0}})


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


def test_load_workflow_rejects_a_template_json_cannot_carry_to_a_server(tmp_path: Path) -> None:
    huge = {"3": {"class_type": "KSampler", "inputs": {"seed": 2**70}}}
    with pytest.raises(BadConfig, match=r"wf\.json: cannot be sent as JSON"):
        load_workflow(_write(tmp_path, "", huge))


def test_a_rendered_graph_shares_nothing_with_its_template(tmp_path: Path) -> None:
    wf = load_workflow(_write(tmp_path, '[bind]\npositive = "6.inputs.text"\n'))
    graph = wf.render({"positive": "x"})
    graph["3"]["inputs"]["seed"] = 99
    assert wf.template == TEMPLATE and graph["6"]["inputs"]["text"] == "x"


@pytest.fixture(scope="module")
def object_info() -> dict[str, Any]:
    return json.loads(STOCK_OBJECT_INFO.read_text())


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


def _demo(name: str) -> Workflow:
    return load_workflow(DEMO / f"{name}.json")


def _chunk(k: int, chunks: int = 3) -> dict[str, Any]:
    """The params the planner gives every job of chunk k of a 3-chunk batch."""
    previous = f"b0001-v/ref/chunk_{k - 1:03}.png" if k > 1 else None
    return {**SAMPLE_PARAMS, "chunk": k, "chunks": chunks, "prev_ref_image_path": previous,
            "prev_combined_path": f"b0001-v/combined/combined_{k - 1:03}.mp4" if k > 1 else None}


def _rendered_problems(wf: Workflow, graph: dict[str, Any], info: dict[str, Any]
                       ) -> list[str]:
    """Checks of a rendered graph; the inputs naming files other jobs write are left out:
    the server checks those when the job is posted (they do not exist before)."""
    files = {p: [path for path in ([spec] if isinstance(spec, str) else spec)
                 if path.split(".")[0] in graph]
             for p, spec in wf.bindings.items() if p.endswith("_path")}
    return check_against_object_info(graph, info, template_name=wf.name, server="s",
                                     bindings=files)


@pytest.mark.parametrize("name", ["high", "low", "combine"])
@pytest.mark.parametrize("k", [1, 2])
def test_demo_workflows_render_and_pass_the_server_checks(name: str, k: int,
                                                          object_info: dict[str, Any]) -> None:
    wf = _demo(name)
    assert wf.check(object_info, server="stock") == []
    graph = wf.render(_chunk(k))
    assert _rendered_problems(wf, graph, object_info) == []
    prefixes = [n["inputs"]["filename_prefix"] for n in graph.values()
                if "filename_prefix" in n["inputs"]]
    assert prefixes and set(prefixes) == {SAMPLE_PARAMS["output_prefix"]}


def test_demo_high_reads_the_previous_reference_frame_from_chunk_2_on() -> None:
    wf = _demo("high")
    first, second = wf.render(_chunk(1)), wf.render(_chunk(2))
    assert {"3", "4"} <= second.keys() and not {"3", "4"} & first.keys()
    assert second["3"]["inputs"]["image"] == "b0001-v/ref/chunk_001.png"
    assert wf.produces == {"latent_path": "2"}


def test_demo_combine_joins_the_previous_video_except_on_the_first_chunk() -> None:
    wf = _demo("combine")
    first, later = wf.render(_chunk(1)), wf.render(_chunk(3))
    assert first.keys() == {"1", "2", "6", "7"}
    assert first["6"]["inputs"]["images"] == ["2", 0]
    assert later["6"]["inputs"]["images"] == ["5", 0]
    assert later["3"]["inputs"]["file"] == "b0001-v/combined/combined_002.mp4"
    assert later["1"]["inputs"]["file"] == SAMPLE_PARAMS["chunk_video_path"]


def test_demo_low_varies_with_seed_and_chunk() -> None:
    wf = _demo("low")
    base = wf.render(SAMPLE_PARAMS)
    assert base != wf.render({**SAMPLE_PARAMS, "seed": 7})
    assert base != wf.render({**SAMPLE_PARAMS, "chunk": 3})
    assert base["8"]["inputs"]["latent"] == SAMPLE_PARAMS["latent_path"]


def test_demo_workflows_fit_the_simulators_object_info(tmp_path: Path) -> None:
    """The simulator serves the recorded real server's node list, with its own files."""
    with start_simulator(0, input_dir=tmp_path / "in", output_dir=tmp_path / "out") as sim, \
            ComfyClient(sim.url) as client:
        info = client.object_info()
    for name in ("high", "low", "combine"):
        assert _demo(name).check(info, server="sim") == []


# --- the sidecar's other tables -----------------------------------------------------------


PRODUCER = {**TEMPLATE, "20": {"class_type": "SaveImage",
                               "inputs": {"images": ["12", 0], "filename_prefix": "x"}}}


def test_params_are_defaults_the_job_can_override(tmp_path: Path) -> None:
    path = _write(tmp_path, '[bind]\nmodel = "4.inputs.ckpt_name"\npositive = "6.inputs.text"\n'
                            '[params]\nmodel = "wan.safetensors"\n')
    wf = load_workflow(path)
    assert wf.render({"positive": "p"})["4"]["inputs"]["ckpt_name"] == "wan.safetensors"
    assert wf.render({"positive": "p", "model": "other.gguf"})["4"]["inputs"]["ckpt_name"] \
        == "other.gguf"


def test_check_tests_params_values_like_literals(tmp_path: Path,
                                                 object_info: dict[str, Any]) -> None:
    path = _write(tmp_path, '[bind]\nmodel = "4.inputs.ckpt_name"\npositive = "6.inputs.text"\n'
                            '[params]\nmodel = "wan.safetensors"\n')
    info = copy.deepcopy(object_info)
    info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"] = [["sd15.safetensors"]]
    problems = [p for p in load_workflow(path).check(info, server="gpu0") if "node 4" in p]
    assert problems == ["workflow 'wf' on gpu0: node 4 (CheckpointLoaderSimple): "
                        "ckpt_name='wan.safetensors' is not one of ['sd15.safetensors']"]


def test_check_flags_produced_files_of_nodes_that_report_none(tmp_path: Path,
                                                              object_info: dict[str, Any]
                                                              ) -> None:
    path = _write(tmp_path, '[produces]\nlatent_path = "5"\nref = "20"\n', PRODUCER)
    problems = load_workflow(path).check(object_info, server="s")
    assert "workflow 'wf' on s: [produces] latent_path = '5', but EmptyLatentImage is not an " \
           "output node, so ComfyUI reports no file for it" in problems
    assert not [p for p in problems if "'20'" in p]


def test_check_flags_rule_paths_the_class_does_not_declare(tmp_path: Path,
                                                           object_info: dict[str, Any]) -> None:
    template = copy.deepcopy(TEMPLATE)
    template["9"]["inputs"]["mask"] = ["12", 1]
    path = _write(tmp_path, '[set_when_none.ref]\n"9.inputs.mask" = ["5", 0]\n', template)
    assert "workflow 'wf' on s: 'ref' is bound to '9.inputs.mask', but ImageAddNoise declares " \
           "no input 'mask'" in load_workflow(path).check(object_info, server="s")


@pytest.mark.parametrize(("toml", "message"), [
    ('[set_when_none.ref]\n"9.inputs.image" = ["44", 0]\n', "links to node '44'"),
    ('[set_when_none.ref]\n"9.inputs.nope" = 1\n', "no input 'nope'"),
    ('[set_when_none.ref]\n"9.inputs.image" = [1, 2, 3]\n', "must be a value or a link"),
    ('[set_when_none]\nref = 3\n', r"\[set_when_none.ref\] must be a table"),
    ('[produces]\nlatent = "44"\n', "no node '44'"),
    ('[produces]\nlatent = "5.inputs.width"\n', "must be one node id"),
    ('[params]\nmodel = "m.safetensors"\n', r"\[params\] \['model'\] are bound to no input"),
    ('[params]\nmodel = ["a"]\n[bind]\nmodel = "4.inputs.ckpt_name"\n',
     "params.model must be a string"),
])
def test_load_workflow_rejects_bad_rule_tables(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(BadConfig, match=message):
        load_workflow(_write(tmp_path, toml))


# --- workflows/wan22: the reference pipeline ----------------------------------------------

WAN22 = REPO / "workflows" / "wan22"


def _spec(kind: Any, **options: Any) -> list[Any]:
    return [kind, options] if options else [kind]


def _node(required: dict[str, Any], optional: dict[str, Any] | None = None, *,
          output: tuple[str, ...] = (), output_node: bool = False) -> dict[str, Any]:
    return {"input": {"required": required, "optional": optional or {}},
            "output": list(output), "output_node": output_node}


def _wan22_nodes() -> dict[str, Any]:
    """The classes of ComfyUI-WanVideoWrapper and VideoHelperSuite the templates use, as
    their INPUT_TYPES declare them, with the model files the sidecars name installed."""
    frames = _spec("INT", min=1, max=10000, step=4)
    size = _spec("INT", min=64, max=8096, step=8)
    unit = _spec("FLOAT", min=0.0, max=1.0)
    video = {"video": [["chunk.mp4"]], "force_rate": _spec("FLOAT", min=0, max=60),
             "custom_width": _spec("INT", min=0), "custom_height": _spec("INT", min=0),
             "frame_load_cap": _spec("INT", min=0), "skip_first_frames": _spec("INT", min=0),
             "select_every_nth": _spec("INT", min=1)}
    files = {n: [[v for p in ("high", "low") for k, v in load_workflow(
        WAN22 / f"{p}.json").params.items() if k == n]] for n in
        ("t5_model", "lora", "vace_module", "model", "vae")}
    return {
        "LoadWanVideoT5TextEncoder": _node(
            {"model_name": files["t5_model"], "precision": [["fp32", "bf16"]]},
            {"load_device": [["main_device", "offload_device"]],
             "quantization": [["disabled", "fp8_e4m3fn"]]}, output=("WANTEXTENCODER",)),
        "WanVideoTextEncode": _node(
            {"positive_prompt": _spec("STRING"), "negative_prompt": _spec("STRING")},
            {"t5": ["WANTEXTENCODER"], "force_offload": ["BOOLEAN"],
             "use_disk_cache": ["BOOLEAN"], "device": [["gpu", "cpu"]]},
            output=("WANVIDEOTEXTEMBEDS",)),
        "WanVideoLoraSelect": _node(
            {"lora": files["lora"], "strength": _spec("FLOAT", min=-1000.0, max=1000.0)},
            {"prev_lora": ["WANVIDLORA"], "low_mem_load": ["BOOLEAN"],
             "merge_loras": ["BOOLEAN"]}, output=("WANVIDLORA",)),
        "WanVideoVACEModelSelect": _node({"vace_model": files["vace_module"]},
                                         output=("VACEPATH",)),
        "WanVideoBlockSwap": _node(
            {"blocks_to_swap": _spec("INT", min=0, max=48), "offload_img_emb": ["BOOLEAN"],
             "offload_txt_emb": ["BOOLEAN"]},
            {"use_non_blocking": ["BOOLEAN"], "vace_blocks_to_swap": _spec("INT", min=0, max=15)},
            output=("BLOCKSWAPARGS",)),
        "WanVideoModelLoader": _node(
            {"model": files["model"], "base_precision": [["fp32", "bf16", "fp16", "fp16_fast"]],
             "quantization": [["disabled", "fp8_e4m3fn", "fp8_e4m3fn_scaled"]],
             "load_device": [["main_device", "offload_device"]]},
            {"attention_mode": [["sdpa", "sageattn"]], "block_swap_args": ["BLOCKSWAPARGS"],
             "lora": ["WANVIDLORA"], "extra_model": ["VACEPATH"]}, output=("WANVIDEOMODEL",)),
        "WanVideoVAELoader": _node({"model_name": files["vae"]},
                                   {"precision": [["fp16", "fp32", "bf16"]]}, output=("WANVAE",)),
        "WanVideoVACEEncode": _node(
            {"vae": ["WANVAE"], "width": size, "height": size, "num_frames": frames,
             "strength": _spec("FLOAT", min=0.0, max=10.0), "vace_start_percent": unit,
             "vace_end_percent": unit},
            {"input_frames": ["IMAGE"], "ref_images": ["IMAGE"], "input_masks": ["MASK"],
             "prev_vace_embeds": ["WANVIDIMAGE_EMBEDS"], "tiled_vae": ["BOOLEAN"]},
            output=("WANVIDIMAGE_EMBEDS",)),
        "WanVideoEmptyEmbeds": _node({"width": size, "height": size, "num_frames": frames},
                                     output=("WANVIDIMAGE_EMBEDS",)),
        "WanVideoSampler": _node(
            {"model": ["WANVIDEOMODEL"], "image_embeds": ["WANVIDIMAGE_EMBEDS"],
             "steps": _spec("INT", min=1), "cfg": _spec("FLOAT", min=0.0, max=30.0),
             "shift": _spec("FLOAT", min=0.0, max=1000.0),
             "seed": _spec("INT", min=0, max=2**64 - 1), "force_offload": ["BOOLEAN"],
             "scheduler": [["unipc", "dpm++", "euler", "lcm"]],
             "riflex_freq_index": _spec("INT", min=0, max=1000)},
            {"text_embeds": ["WANVIDEOTEXTEMBEDS"], "samples": ["LATENT"],
             "denoise_strength": unit, "batched_cfg": ["BOOLEAN"],
             "rope_function": [["default", "comfy", "comfy_chunked"]],
             "start_step": _spec("INT", min=0, max=10000),
             "end_step": _spec("INT", min=-1, max=10000), "add_noise_to_samples": ["BOOLEAN"]},
            output=("LATENT", "LATENT")),
        "WanVideoDecode": _node(
            {"vae": ["WANVAE"], "samples": ["LATENT"], "enable_vae_tiling": ["BOOLEAN"],
             "tile_x": _spec("INT", min=40, max=2048), "tile_y": _spec("INT", min=40, max=2048),
             "tile_stride_x": _spec("INT", min=32, max=2040),
             "tile_stride_y": _spec("INT", min=32, max=2040)}, output=("IMAGE",)),
        "VHS_VideoCombine": _node(
            {"images": ["IMAGE"], "frame_rate": _spec("FLOAT", min=1), "loop_count":
             _spec("INT", min=0, max=100), "filename_prefix": _spec("STRING"),
             "format": [["image/gif", "image/webp", "video/h264-mp4"]], "pingpong": ["BOOLEAN"],
             "save_output": ["BOOLEAN"]}, {"audio": ["AUDIO"], "vae": ["VAE"]},
            output=("VHS_FILENAMES",), output_node=True),
        "VHS_LoadVideo": _node(video, {"vae": ["VAE"]},
                               output=("IMAGE", "INT", "AUDIO", "VHS_VIDEOINFO")),
    }


@pytest.fixture(scope="module")
def wan22_info(object_info: dict[str, Any]) -> dict[str, Any]:
    return {**object_info, **_wan22_nodes()}


def _wan22(name: str) -> Workflow:
    return load_workflow(WAN22 / f"{name}.json")


@pytest.mark.parametrize("name", ["high", "low", "combine"])
def test_wan22_templates_fit_a_server_with_the_wrapper_nodes(name: str,
                                                             wan22_info: dict[str, Any],
                                                             object_info: dict[str, Any]
                                                             ) -> None:
    wf = _wan22(name)
    assert wf.check(wan22_info, server="gpu0") == []
    for k in (1, 2, 3):
        assert _rendered_problems(wf, wf.render(_chunk(k)), wan22_info) == []
    stock = wf.check(object_info, server="stock")
    assert stock and all("unknown class_type" in p for p in stock)


def test_wan22_high_uses_the_reference_frame_from_chunk_2_on() -> None:
    wf = _wan22("high")
    first, second, last = (wf.render({**_chunk(k), "frames": f}) for k, f in
                           ((1, 101), (2, 101), (3, 97)))
    assert "8" not in first and "ref_images" not in first["9"]["inputs"]
    assert second["9"]["inputs"]["ref_images"] == ["8", 0]
    assert second["8"]["inputs"]["image"] == "b0001-v/ref/chunk_001.png"
    assert last["8"]["inputs"]["image"] == "b0001-v/ref/chunk_002.png"
    assert last["9"]["inputs"]["num_frames"] == 97 and first["9"]["inputs"]["num_frames"] == 101
    sampler = second["10"]["inputs"]
    assert (sampler["seed"], sampler["start_step"], sampler["end_step"]) == \
        (SAMPLE_PARAMS["seed"], 0, 4)
    assert second["2"]["inputs"]["positive_prompt"] == SAMPLE_PARAMS["positive"]
    assert second["6"]["inputs"]["model"] == wf.params["model"]
    assert wf.produces == {"latent_path": "11"}


def test_wan22_low_finishes_the_high_latent() -> None:
    wf = _wan22("low")
    graph = wf.render(_chunk(2))
    assert graph["8"]["inputs"]["latent"] == SAMPLE_PARAMS["latent_path"]
    assert graph["9"]["inputs"]["samples"] == ["8", 0]
    assert (graph["9"]["inputs"]["start_step"], graph["9"]["inputs"]["end_step"]) == (4, -1)
    assert wf.render(_chunk(1)) == graph  # no conditional edits in LOW
    assert wf.produces == {"chunk_video_path": "11", "ref_image_path": "13"}
    assert _wan22("high").params["model"] != wf.params["model"]


def test_wan22_combine_appends_to_the_previous_video_except_on_the_first() -> None:
    wf = _wan22("combine")
    first, second, last = (wf.render(_chunk(k)) for k in (1, 2, 3))
    assert first.keys() == {"1", "4"} and first["4"]["inputs"]["images"] == ["1", 0]
    assert second["3"]["inputs"] == {"image1": ["2", 0], "image2": ["1", 0]}
    assert second["2"]["inputs"]["video"] == "b0001-v/combined/combined_001.mp4"
    assert last["2"]["inputs"]["video"] == "b0001-v/combined/combined_002.mp4"
    assert last["4"]["inputs"]["images"] == ["3", 0]


def test_wan22_check_names_a_missing_model_file(wan22_info: dict[str, Any]) -> None:
    info = copy.deepcopy(wan22_info)
    info["WanVideoModelLoader"]["input"]["required"]["model"] = [["other.safetensors"]]
    (problem,) = _wan22("high").check(info, server="gpu0 (http://10.0.0.5:8188)")
    assert problem.startswith("workflow 'high' on gpu0 (http://10.0.0.5:8188): node 6 "
                              "(WanVideoModelLoader): model='Wan2_2-T2V-A14B_HIGH")


def test_dry_run_checks_against_a_saved_object_info(tmp_path: Path, wan22_info: dict[str, Any],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    settings = config.load_settings(overrides={
        "STATE_DIR": str(tmp_path / "state"),
        "WORKFLOWS": {k: str(WAN22 / f"{k.lower()}.json") for k in ("HIGH", "LOW", "COMBINE")}})
    prompt = tmp_path / "p.txt"
    prompt.write_text("p\n\n250\n\nA test.\n")
    saved = tmp_path / "object_info.json"
    saved.write_text(json.dumps(wan22_info))
    assert daemon.dry_run(settings, [prompt], saved) == 0
    assert capsys.readouterr().err == ""
    graphs = sorted((tmp_path / "state" / "dry-run" / "b0001").glob("b0001_*.json"))
    assert len(graphs) == 9
    assert daemon.dry_run(settings, [prompt]) == 1
    assert "on stock ComfyUI: node 11: unknown class_type 'VHS_VideoCombine'" in \
        capsys.readouterr().err
