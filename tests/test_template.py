"""configs/template.yaml is right by default: every key is listed with the code's default, except the paths a
user must edit (``EDIT``) and the values for a real language model instead of the toy world (``SET``); and a run of
the template with only its paths edited gives the numbers of a carefully hand-tuned config."""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from datamodules import ProbeDataModule
from datamodules.probe_data import EvalBatchSettings
from probe import ProbeModule
from probe.optim_loading import OptimizerSettings

from support import REPO, read_summary

TEMPLATE = REPO / "configs" / "template.yaml"


def code_defaults(cls: type) -> dict[str, Any]:
    """The defaults of a LightningModule's / DataModule's ``__init__`` as plain data (dataclasses as dicts)."""
    out = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self":
            continue
        default = parameter.default
        if name == "optimizer":  # None: the policy directory's optimizer.pt; the template names the file
            default = OptimizerSettings(path="")
        if name == "evals":
            default = [EvalBatchSettings()]
        out[name] = (
            [asdict(d) for d in default]
            if isinstance(default, list) and default and is_dataclass(default[0])
            else asdict(default)
            if is_dataclass(default)
            else default
        )
    return out


def leaves(node: yaml.Node, path: str = ""):
    """``(dotted key, value node)`` for every scalar or flow sequence of a composed YAML tree."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield from leaves(value, f"{path}.{key.value}" if path else key.value)
    elif (
        isinstance(node, yaml.SequenceNode)
        and not node.flow_style
        and any(isinstance(v, yaml.MappingNode) for v in node.value)
    ):
        for i, value in enumerate(node.value):
            yield from leaves(value, f"{path}.{i}")
    else:
        yield path, node


def lookup(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree[int(key)] if isinstance(tree, list) else tree[key]
    return tree


def marker(lines: list[str], node: yaml.Node) -> str:
    """EDIT or SET when the node's line (or, for a nested mapping, the line of its key) carries one."""
    comment = lines[node.start_mark.line].partition(" #")[2]
    found = re.search(r"\b(EDIT|SET)\b", comment)
    return found.group(1) if found else ""


def test_the_template_lists_every_key_with_the_codes_default_unless_marked():
    text = TEMPLATE.read_text()
    lines, root = text.splitlines(), yaml.compose(text)
    config = yaml.safe_load(text)
    defaults = {"model": code_defaults(ProbeModule), "data": code_defaults(ProbeDataModule)}
    for section in ("model", "data"):
        listed = {k for k, _ in leaves(lookup_node(root, f"{section}.init_args"))}
        for key, node in leaves(lookup_node(root, f"{section}.init_args")):
            default_key = re.sub(r"^evals\.\d+", "evals.0", key)
            try:
                default = lookup(defaults[section], default_key)
            except (KeyError, IndexError, TypeError):
                pytest.fail(f"template key {section}.init_args.{key} is not a setting of the code")
            value = lookup(config[section]["init_args"], key)
            if value != default and not isinstance(default, dict):
                assert marker(lines, node), (
                    f"{section}.init_args.{key}: template {value!r} but the code's default is {default!r}, and the "
                    "line is marked neither EDIT nor SET"
                )
        missing = [
            k
            for k in flat_keys(defaults[section])
            if not any(k == re.sub(r"^evals\.\d+", "evals.0", x) or x.startswith(k + ".") for x in listed)
        ]
        assert not missing, f"the template leaves out {section} settings {missing}"


def lookup_node(node: yaml.Node, dotted: str) -> yaml.Node:
    for key in dotted.split("."):
        node = next(v for k, v in node.value if k.value == key)
    return node


def flat_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out += flat_keys(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            out += flat_keys(value[0], f"{prefix}{key}.0.")
        else:
            out.append(f"{prefix}{key}")
    return out


def test_every_path_a_user_must_edit_is_marked():
    for number, line in enumerate(TEMPLATE.read_text().splitlines(), 1):
        if "/path/to/" in line:
            assert "EDIT" in line.partition(" #")[2], f"template line {number} holds a placeholder path without EDIT"


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory, run_predict) -> tuple[Path, Path]:
    """U and E of a small toy run, as rollout files (what an RL framework would write)."""
    root = tmp_path_factory.mktemp("source")
    run_predict(root, "source")
    return root / "source" / "rollouts" / "update.jsonl", root / "source" / "rollouts" / "eval_00.jsonl"


def run_config(text: str, root: Path, name: str) -> dict:
    from probe.cli import main

    config = root / f"{name}.yaml"
    config.write_text(text)
    main(
        [
            "predict",
            "--config",
            str(config),
            "--model.init_args.run.root",
            str(root),
            "--model.init_args.run.name",
            name,
            "--trainer.logger",
            "false",
        ]
    )
    return read_summary(root / name)


def test_the_template_with_only_its_paths_edited_gives_the_hand_tuned_numbers(
    rollouts, toy_world_dir, tmp_path, monkeypatch
):
    """On a float32 HF checkpoint (the toy world's) the template's defaults are what a careful user would set."""
    monkeypatch.chdir(tmp_path)
    update, evaluation = rollouts
    edits = {
        "/path/to/run/checkpoint-500": str(toy_world_dir),
        "/path/to/rollouts/update.jsonl": str(update),
        "/path/to/gsm8k_train.jsonl": "toy",
        "/path/to/gsm8k_test.jsonl": "toy",
    }
    text = TEMPLATE.read_text()
    for placeholder, path in edits.items():
        text = text.replace(placeholder, path)
    text = text.replace('- path: ""  ', f"- path: {evaluation}  ")  # both evaluation batches read E's file
    template = run_config(text, tmp_path, "template")

    hand_tuned = f"""
seed_everything: 0
model:
  class_path: probe.ProbeModule
  init_args:
    policy: {{path: {toy_world_dir}, dtype: float32}}
    optimizer: {{path: {toy_world_dir}, param_order: model, kind: adamw}}
    reconstruction: {{max_grad_norm: 1.0}}
    probe: {{parts: [full, baseline, grad], n_etas: 5, eval_update_matrix: false}}
data:
  class_path: datamodules.ProbeDataModule
  init_args:
    update: {{path: {update}}}
    evals: [{{path: {evaluation}}}, {{path: {evaluation}}}]
trainer: {{accelerator: cpu, devices: 1, inference_mode: false}}
"""
    tuned = run_config(hand_tuned, tmp_path, "hand_tuned")

    assert template["choices"]["policy.dtype"] == {"value": "float32", "source": "auto: weights saved as float32"}
    assert [e["name"] for e in template["evals"]] == ["eval_00", "eval_01"]
    assert template["plan"] == {**tuned["plan"], "policy": template["plan"]["policy"]}
    for ours, theirs in zip(template["evals"], tuned["evals"]):
        assert json.dumps(ours["parts"], sort_keys=True) == json.dumps(theirs["parts"], sort_keys=True)
        assert ours["attribution"] == theirs["attribution"] and ours["attribution"]["ok"]
    np.testing.assert_array_equal(
        np.load(tmp_path / "template" / "attributions.npy"), np.load(tmp_path / "hand_tuned" / "attributions.npy")
    )
