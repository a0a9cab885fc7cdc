"""The front-end → API workflow converter (no server: node definitions written out as /object_info gives them)."""

import pytest
from comfy_workflow import WorkflowError, to_api_prompt

OBJECT_INFO = {
    "Loader": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
               "input_order": {"required": ["ckpt_name"]}},
    "Sampler": {"input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
                                       "steps": ["INT", {"default": 20}], "denoise": ["FLOAT", {}]},
                          "optional": {"tag": ["STRING", {}], "noise_seed": ["INT", {}],
                                       "count": ["INT", {"control_after_generate": False}]}},
                "input_order": {"required": ["model", "seed", "steps", "denoise"],
                                "optional": ["tag", "noise_seed", "count"]}},
    "LoadImage": {"input": {"required": {"image": [["x.png"], {"image_upload": True}]}},
                  "input_order": {"required": ["image"]}},
    "Number": {"input": {"required": {"value": ["INT", {"forceInput": True}], "scale": ["FLOAT", {}]}},
               "input_order": {"required": ["value", "scale"]}},
}


def node(nid, kind, widgets=(), inputs=(), mode=0, title=None):
    n = {"id": nid, "type": kind, "mode": mode, "widgets_values": list(widgets),
         "inputs": [{"name": name, "link": link} for name, link in inputs]}
    if title:
        n["title"] = title
    return n


def workflow(*nodes, links=()):
    return {"nodes": list(nodes), "links": [list(x) for x in links]}


def sampler(nid=2, link=1, **kw):
    # seed + its "control after generate" value; noise_seed gets one by the legacy name rule; count is told not to
    return node(nid, "Sampler", [123, "randomize", 4, 0.5, "hi", 9, "fixed", 3], [("model", link)], **kw)


def test_widget_values_map_to_inputs_skipping_control_values():
    wf = workflow(node(1, "Loader", ["b.safetensors"]), sampler(), links=[(1, 1, 0, 2, 0, "MODEL")])
    prompt = to_api_prompt(wf, OBJECT_INFO)
    assert prompt["1"] == {"class_type": "Loader", "inputs": {"ckpt_name": "b.safetensors"},
                           "_meta": {"title": "Loader"}}
    assert prompt["2"]["inputs"] == {"model": ["1", 0], "seed": 123, "steps": 4, "denoise": 0.5, "tag": "hi",
                                     "noise_seed": 9, "count": 3}


def test_upload_widget_value_is_skipped_and_force_input_is_a_socket():
    wf = workflow(node(1, "LoadImage", ["x.png", "image"]), node(2, "Number", [2.0], [("value", 5)]),
                  node(3, "Number", [1.0], [("value", 6)]), links=[(5, 3, 0, 2, 0, "INT"), (6, 9, 0, 3, 0, "INT")])
    wf["nodes"].append(node(9, "PrimitiveNode"))
    prompt = to_api_prompt(wf, OBJECT_INFO)
    assert prompt["1"]["inputs"] == {"image": "x.png"}
    assert prompt["2"]["inputs"] == {"value": ["3", 0], "scale": 2.0}
    assert prompt["3"]["inputs"] == {"scale": 1.0}  # a primitive node's value is the widget's own
    assert set(prompt) == {"1", "2", "3"}


def test_reroutes_and_notes_disappear_and_links_go_through():
    wf = workflow(node(1, "Loader", ["a.safetensors"]), node(5, "Reroute", inputs=[("", 1)]), sampler(link=2),
                  node(7, "MarkdownNote", ["# hello"]), links=[(1, 1, 0, 5, 0, "*"), (2, 5, 0, 2, 0, "MODEL")])
    prompt = to_api_prompt(wf, OBJECT_INFO)
    assert set(prompt) == {"1", "2"} and prompt["2"]["inputs"]["model"] == ["1", 0]


def test_overrides_by_type_title_and_id_in_that_precedence():
    wf = workflow(node(1, "Loader", ["a.safetensors"]), sampler(title="First"), sampler(nid=3, title="Second"),
                  links=[(1, 1, 0, 2, 0, "MODEL"), (2, 1, 0, 3, 0, "MODEL")])
    prompt = to_api_prompt(wf, OBJECT_INFO, {"Sampler": {"steps": 2, "seed": 5}, "First": {"steps": 3},
                                             "2": {"steps": 4}})
    assert (prompt["2"]["inputs"]["steps"], prompt["2"]["inputs"]["seed"]) == (4, 5)
    assert (prompt["3"]["inputs"]["steps"], prompt["3"]["inputs"]["seed"]) == (2, 5)


@pytest.mark.parametrize("wf, overrides, message", [
    (workflow(node(1, "Loader", ["a.safetensors", "extra"])), None, "2 widget values, but this server's Loader has 1"),
    (workflow(node(1, "Mystery")), None, "unknown to this server"),
    (workflow(node(1, "Loader", ["a.safetensors"], mode=4)), None, "bypassed"),
    (workflow(node(1, "Loader", ["a.safetensors"])), {"Loader": {"steps": 1}}, "Loader has no input 'steps'"),
    (workflow(node(1, "Loader", ["a.safetensors"])), {"KSampler": {"steps": 1}}, "name no node"),
])
def test_mismatches_are_refused_with_the_reason(wf, overrides, message):
    with pytest.raises(WorkflowError, match=message):
        to_api_prompt(wf, OBJECT_INFO, overrides)


def test_muted_nodes_are_dropped_unless_used():
    wf = workflow(node(1, "Loader", ["a.safetensors"], mode=2), sampler(), links=[(1, 1, 0, 2, 0, "MODEL")])
    with pytest.raises(WorkflowError, match="muted but its output is used"):
        to_api_prompt(wf, OBJECT_INFO)
    assert to_api_prompt(workflow(node(1, "Loader", ["a.safetensors"], mode=2)), OBJECT_INFO) == {}
