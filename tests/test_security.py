"""Untrusted files: probe never runs code that comes with a checkpoint unless the config says so.

* Every ``torch.load`` in the source tree passes ``weights_only=True``; nothing unpickles
  otherwise (``pickle.load``, ``np.load(allow_pickle=True)``), and no ``trust_remote_code`` is on
  by default (checked on the syntax tree of every source file outside tests/).
* A crafted pickle whose ``__reduce__`` would create a marker file, placed as ``optimizer.pt`` (or
  as the policy's ``pytorch_model.bin``) in a copy of the toy world, is refused through the CLI
  with a clear message and the marker never appears; the same file loaded unsafely does create
  it (so the refusal is what protects).
* A checkpoint whose ``config.json`` (or ``tokenizer_config.json``) has an ``auto_map`` pointing
  at custom code is refused unless ``policy.trust_remote_code`` is turned on.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probe.cli import main
from probe.loading import PolicySettings, load_policy, refuse_remote_code
from probe.rundir import RUN_MARKER, RunDirectory, check_run_name, run_path

from support import REPO, predict_args

SKIP_DIRS = {"tests", ".git", ".venv", "venv", "runs", "build", "dist", "__pycache__", "node_modules"}


def probe_args(root: Path, *extra: str) -> list[str]:
    return predict_args(root, "run", *extra, eval_prompts=2, n_etas=2)


# ---------------------------------------------------------------------------------------------
# the source tree


def source_files() -> list[Path]:
    out = []
    for path in REPO.rglob("*.py"):
        if not SKIP_DIRS & set(path.relative_to(REPO).parts[:-1]):
            out.append(path)
    return out


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def is_true(value) -> bool:
    return isinstance(value, ast.Constant) and value.value is True


def test_the_source_tree_is_found():
    files = {p.relative_to(REPO).as_posix() for p in source_files()}
    assert {"probe/optim_loading.py", "probe/loading.py", "probe/rundir.py", "callbacks/writer.py"} <= files


def test_every_torch_load_is_weights_only():
    found, unsafe = 0, []
    for path in source_files():
        for node, owner, name in calls(ast.parse(path.read_text(), str(path))):
            if owner == "torch" and name == "load":
                found += 1
                if not is_true(keyword(node, "weights_only")):
                    unsafe.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found >= 1, "probe loads optimizer state with torch.load"
    assert not unsafe, f"torch.load without weights_only=True at {unsafe}"


def test_nothing_else_unpickles_files():
    unsafe = []
    for path in source_files():
        for node, owner, name in calls(ast.parse(path.read_text(), str(path))):
            if (owner in ("pickle", "cPickle", "dill", "joblib") and name in ("load", "loads")) or (
                owner in ("np", "numpy") and name == "load" and is_true(keyword(node, "allow_pickle"))
            ):
                unsafe.append(f"{path.relative_to(REPO)}:{node.lineno} {owner}.{name}")
    assert not unsafe, unsafe


def test_trust_remote_code_is_never_on_by_default():
    on = []
    for path in source_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and node.target.id == "trust_remote_code"
            ):
                if is_true(node.value):  # a dataclass field default
                    on.append(f"{path.relative_to(REPO)}:{node.lineno}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                pairs = list(zip(args.args[len(args.args) - len(args.defaults) :], args.defaults))
                pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
                on += [
                    f"{path.relative_to(REPO)}:{node.lineno}"
                    for a, d in pairs
                    if a.arg == "trust_remote_code" and is_true(d)
                ]
            if isinstance(node, ast.Call) and is_true(keyword(node, "trust_remote_code")):
                on.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not on, f"trust_remote_code turned on at {on}"
    assert PolicySettings(path="x").trust_remote_code is False


# ---------------------------------------------------------------------------------------------
# crafted pickles


class CreatesMarker:
    """Unpickling this runs ``exec`` (the classic pickle payload); here it only creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def crafted_optimizer_state(path: Path, marker: Path, *, torch_format: bool = True) -> Path:
    state = {
        "state": {},
        "param_groups": [{"params": [0], "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}],
        "payload": CreatesMarker(marker),
    }
    if torch_format:
        torch.save(state, path)  # a zip archive, as torch.save writes every optimizer.pt
    else:
        with open(path, "wb") as f:
            pickle.dump(state, f)  # a bare pickle
    return path


@pytest.fixture()
def world_copy(tmp_path, toy_world_dir) -> Path:
    world = tmp_path / "world"
    shutil.copytree(toy_world_dir, world)
    return world


def test_the_crafted_pickle_runs_code_when_loaded_unsafely(tmp_path):
    # the control: without weights_only the payload runs, so the refusals below are what protects
    marker = tmp_path / "marker"
    path = crafted_optimizer_state(tmp_path / "optimizer.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_a_crafted_optimizer_pt_is_refused_by_the_cli_process_and_runs_nothing(world_copy, tmp_path):
    marker = tmp_path / "marker"
    crafted_optimizer_state(world_copy / "optimizer.pt", marker)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "probe",
            *probe_args(tmp_path / "runs", "--model.init_args.policy.path", str(world_copy)),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "WANDB_MODE": "disabled"},
        timeout=300,
    )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: ") and "optimizer.pt was refused for safety" in last
    assert "Unsupported global: GLOBAL exec" in last and "only loads with weights_only=True" in last
    assert not marker.exists(), "the payload ran"
    summary = tmp_path / "runs" / "run" / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text()).get("status") != "complete"


def test_a_crafted_bare_pickle_optimizer_pt_is_refused(world_copy, tmp_path):
    marker = tmp_path / "marker"
    crafted_optimizer_state(world_copy / "optimizer.pt", marker, torch_format=False)
    with pytest.raises(ValueError, match=r"optimizer.pt was refused for safety: it is not a weights-only file"):
        main(probe_args(tmp_path / "runs", "--model.init_args.policy.path", str(world_copy)))
    assert not marker.exists()


def test_a_crafted_pickled_policy_weight_file_is_refused(world_copy, tmp_path):
    # a checkpoint with pytorch_model.bin instead of safetensors: transformers loads it with weights_only=True
    marker = tmp_path / "marker"
    (world_copy / "model.safetensors").unlink()
    torch.save(
        {"lm_head.weight": torch.zeros(16, 64), "payload": CreatesMarker(marker)}, world_copy / "pytorch_model.bin"
    )
    with pytest.raises(
        ValueError, match=r"the weights in .* were refused for safety.*Unsupported global: GLOBAL exec.*Fix:"
    ):
        main(probe_args(tmp_path / "runs", "--model.init_args.policy.path", str(world_copy)))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# custom code shipped with a checkpoint


def ship_custom_code(world: Path, marker: Path, config_file: str) -> None:
    """Point ``auto_map`` of ``config_file`` at a module that would create ``marker`` when imported."""
    (world / "custom_model.py").write_text(
        f"open({str(marker)!r}, 'w').write('code ran')\nfrom transformers import LlamaConfig as CustomConfig, "
        "LlamaForCausalLM as CustomModel\nfrom transformers import PreTrainedTokenizerFast as CustomTokenizer\n"
    )
    config = json.loads((world / config_file).read_text())
    config["auto_map"] = (
        {"AutoConfig": "custom_model.CustomConfig", "AutoModelForCausalLM": "custom_model.CustomModel"}
        if config_file == "config.json"
        else {"AutoTokenizer": ["custom_model.CustomTokenizer", None]}
    )
    (world / config_file).write_text(json.dumps(config))


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_custom_code_in_a_checkpoint_is_refused_without_trust_remote_code(config_file, world_copy, tmp_path):
    marker = tmp_path / "marker"
    ship_custom_code(world_copy, marker, config_file)
    with pytest.raises(
        ValueError,
        match=rf"{config_file} has an auto_map .*ships its own Python code.*"
        r"Fix: if you trust the code .*policy.trust_remote_code=true",
    ):
        main(probe_args(tmp_path / "runs", "--model.init_args.policy.path", str(world_copy)))
    assert not marker.exists()
    with pytest.raises(ValueError, match="has an auto_map"):
        load_policy(world_copy)  # the library default is off too


def test_trust_remote_code_lets_a_checkpoint_with_custom_code_through_the_check(world_copy, tmp_path):
    ship_custom_code(world_copy, tmp_path / "marker", "config.json")
    refuse_remote_code(world_copy, trust_remote_code=True)  # no error: the user opted in


# ---------------------------------------------------------------------------------------------
# the run root is a boundary: a run name is one folder inside run.root, and only a folder probe made is deleted


@pytest.mark.parametrize("name", ["..", "../x", ".", "a/b", "/tmp/x", "~", "~/x", "", "a\\b", "x\0y"])
def test_a_run_name_that_is_not_one_folder_name_is_refused(name):
    with pytest.raises(ValueError, match="is not a single folder name"):
        check_run_name(name)


def test_a_plain_run_name_is_a_folder_inside_the_root(tmp_path):
    assert run_path(tmp_path, "step-500") == tmp_path.resolve() / "step-500"


def test_a_tilde_in_the_run_root_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert run_path("~/probe_runs", "a") == tmp_path.resolve() / "probe_runs" / "a"
    assert not Path("~").exists()


def test_a_run_name_that_is_a_symbolic_link_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "run").symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link"):
        RunDirectory.open(str(root), "run")
    assert not any(outside.iterdir())


def test_a_folder_probe_did_not_make_is_neither_written_nor_deleted(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    (tmp_path / "mine" / "summary.json").write_text(json.dumps({"status": "complete"}))
    with pytest.raises(FileExistsError, match="was not made by probe"):
        RunDirectory.open(str(tmp_path), "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["summary.json", "thesis.tex"]


def test_overwrite_deletes_only_a_finished_probe_run(tmp_path):
    run = RunDirectory.open(str(tmp_path), "a")
    assert (run.path / RUN_MARKER).is_file()
    run.finish({})
    (tmp_path / "other").mkdir()
    again = RunDirectory.open(str(tmp_path), "a", overwrite=True)
    assert again.path == run.path and not (run.path / "summary.json").exists() and (tmp_path / "other").is_dir()


def test_a_fit_run_folder_is_not_taken_for_a_predict_run(tmp_path):
    RunDirectory.open(str(tmp_path), "a", kind="fit")
    with pytest.raises(FileExistsError, match="holds a probe 'fit' run"):
        RunDirectory.open(str(tmp_path), "a", kind="predict")


@pytest.mark.parametrize("name", ["..", ".", "../escape"])
def test_the_cli_never_writes_or_deletes_outside_the_run_root(tmp_path, name, toy_world_dir):
    root = tmp_path / "parent" / "root"
    (root / "finished").mkdir(parents=True)
    (root / "finished" / "keep.txt").write_text("kept")
    (tmp_path / "parent" / "sibling.txt").write_text("kept")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="is not a single folder name"):
        main(predict_args(root, name, "--model.init_args.run.overwrite", "true", eval_prompts=2, n_etas=2))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_a_fit_run_name_outside_the_root_is_refused(tmp_path, toy_world_dir):
    from probe.grpo import FitRunSettings, GRPOModule

    with pytest.raises(ValueError, match="is not a single folder name"):
        GRPOModule(run=FitRunSettings(root=str(tmp_path), name="../x"))


def test_a_run_folder_that_holds_a_link_is_neither_written_nor_deleted(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("kept")
    root = tmp_path / "root"
    run = RunDirectory.open(str(root), "a")
    (run.path / "rollouts").symlink_to(outside)  # a link planted in a finished-looking run folder
    run.finish({})
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="holds a symbolic link"):
            RunDirectory.open(str(root), "a", overwrite=overwrite)
    assert (outside / "keep.txt").read_text() == "kept" and (run.path / "rollouts").is_symlink()


def crafted_distributed_checkpoint(path: Path, marker: Path, model: torch.nn.Module) -> Path:
    """A distributed checkpoint (torch.distributed.checkpoint, as ModelParallelStrategy writes ``last.ckpt``) whose
    optimizer state carries the payload among its param group's plain values."""
    import torch.distributed.checkpoint as dcp

    names = [n for n, _ in model.named_parameters()]
    groups = [{"params": names, "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}]
    groups[0]["payload"] = CreatesMarker(marker)
    dcp.save({"optimizer_0": {"state": {}, "param_groups": groups}}, checkpoint_id=str(path), no_dist=True)
    return path


def test_a_crafted_distributed_checkpoint_runs_nothing(toy_world_dir, tmp_path):
    """torch reads a distributed checkpoint's ``.metadata`` with pickle.load and its plain values with
    ``torch.load(weights_only=False)``; probe reads both without running what they pickle."""
    from probe.optim_loading import load_optimizer_state

    policy, _ = load_policy(toy_world_dir)
    marker = tmp_path / "marker"
    checkpoint = crafted_distributed_checkpoint(tmp_path / "last.ckpt", marker, policy)
    with pytest.raises(ValueError, match=r"refused for safety.*GLOBAL exec"):
        load_optimizer_state(checkpoint, policy)
    assert not marker.exists(), "the payload ran"
    with open(checkpoint / ".metadata", "wb") as f:  # the metadata itself replaced by the payload
        pickle.dump(CreatesMarker(marker), f)
    with pytest.raises(ValueError, match=r"\.metadata was refused for safety: it pickles the global builtins\.exec"):
        load_optimizer_state(checkpoint, policy)
    assert not marker.exists(), "the payload ran"
