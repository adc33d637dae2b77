"""One engine under both paths, and the stages of a predict run handing results through one typed run state.

What a user relies on: ``python -m probe predict`` is the engine (``probe.engine``) run batch by batch
behind Lightning, so calling the engine directly on the run's own U, E and update gives the run's
numbers; the callbacks' order does not matter (the observers only observe, the stages hand their
results through the run state); a stage whose input is missing says which stage provides it.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.rollouts import read_rollouts
from probe.batch import collate
from probe.engine import EvalBatch, make_plan, probe_eval
from probe.loading import load_policy
from probe.run_state import PredictRunState
from probe.settings import PrecisionSettings, ProbeSettings
from probe.update import Update


def numbers_of(summary: dict) -> dict:
    """The summary without what may differ between two runs of the same inputs (timings, run name)."""
    out = {k: v for k, v in summary.items() if k not in ("timings", "environment")}
    out["config"] = json.loads(json.dumps(summary["config"]))
    out["config"]["run"].pop("name")
    return out


@pytest.fixture(scope="module")
def float64_run(tmp_path_factory, run_predict) -> tuple[Path, dict]:
    """A small predict run of the toy policy in float64 (so that any two routes agree to ~1e-12)."""
    root = tmp_path_factory.mktemp("engine")
    summary = run_predict(root, "f64", "--model.init_args.policy.dtype", "float64")
    return root / "f64", summary


def test_the_engine_called_directly_gives_the_numbers_of_the_predict_run(float64_run, toy_world_dir):
    run, summary = float64_run
    config = summary["config"]
    policy, tokenizer = load_policy(toy_world_dir, dtype="float64")
    update = Update.load(run / "update.safetensors")
    pad = tokenizer.pad_token_id
    U = collate(list(read_rollouts(run / "rollouts" / "update.jsonl")), pad_token_id=pad)
    records = list(read_rollouts(run / "rollouts" / "eval_00.jsonl"))
    E = EvalBatch(name="eval_00", batch=collate(records, pad_token_id=pad), temperature=1.0)
    plan = make_plan(ProbeSettings(**config["probe"]), PrecisionSettings(**config["precision"]), update.lr)

    result, _ = probe_eval(policy, update, U, E, plan)  # one process, E in chunks of probe.forward_batch_size

    got, want = result.to_dict(), summary["evals"][0]
    assert got.keys() == want.keys()
    for part, res in want["parts"].items():
        for key, value in res.items():
            # the run split E into predict batches of 16, the direct call into chunks of 32: float64 rounding only
            np.testing.assert_allclose(got["parts"][part][key], value, rtol=1e-10, atol=1e-13, err_msg=f"{part} {key}")
    assert got["attribution"]["sum"] == pytest.approx(want["attribution"]["sum"], rel=1e-10)
    np.testing.assert_allclose(result.arrays["attributions"], np.load(run / "attributions.npy"), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(
        result.arrays["eval_delta_matrix"], np.load(run / "eval_delta_matrix.npy"), rtol=1e-9, atol=1e-14
    )


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_the_order_of_the_callbacks_does_not_change_the_summary(order, float64_run, tmp_path, run_predict, monkeypatch):
    from probe.module import ProbeModule

    default = ProbeModule.configure_callbacks

    def permuted(self):
        callbacks = default(self)
        if order == "reversed":
            return callbacks[::-1]
        random.Random(1).shuffle(callbacks)
        return callbacks

    monkeypatch.setattr(ProbeModule, "configure_callbacks", permuted)
    run, reference = float64_run
    files = [
        f"--data.init_args.update.path={run / 'rollouts' / 'update.jsonl'}",
        f"--data.init_args.evals=[{{path: {run / 'rollouts' / 'eval_00.jsonl'}}}]",
    ]
    summary = run_predict(tmp_path, order, "--model.init_args.policy.dtype", "float64", *files)
    assert summary["status"] == "complete"
    assert numbers_of(summary)["evals"] == numbers_of(reference)["evals"]
    assert numbers_of(summary)["update"] == numbers_of(reference)["update"]
    assert sorted(p.name for p in (tmp_path / order / "plots").iterdir()) == sorted(
        p.name for p in (run / "plots").iterdir()
    )


def test_a_stage_whose_input_is_missing_names_the_stage_that_provides_it(tmp_path, run_predict, monkeypatch):
    from callbacks import UpdateReconstruction
    from probe.module import ProbeModule

    default = ProbeModule.configure_callbacks
    monkeypatch.setattr(
        ProbeModule,
        "configure_callbacks",
        lambda self: [c for c in default(self) if not isinstance(c, UpdateReconstruction)],
    )
    with pytest.raises(RuntimeError, match=r"has no 'plan' yet: it is provided by callbacks.UpdateReconstruction"):
        run_predict(tmp_path, "missing")


def test_the_run_state_refuses_a_field_nobody_provided_yet():
    state = PredictRunState(settings=None, policy=None, tokenizer=None, policy_dir=Path("."))
    with pytest.raises(RuntimeError, match="no 'result' yet: it is provided by callbacks.SNISAggregation"):
        state.require("result")


def test_an_evaluation_batch_out_of_index_order_is_refused(float64_run, toy_world_dir):
    run, summary = float64_run
    policy, tokenizer = load_policy(toy_world_dir, dtype="float64")
    update = Update.load(run / "update.safetensors")
    records = list(read_rollouts(run / "rollouts" / "eval_00.jsonl"))
    batch = collate(records, pad_token_id=tokenizer.pad_token_id, index=list(range(len(records)))[::-1])
    config = summary["config"]
    plan = make_plan(ProbeSettings(**config["probe"]), PrecisionSettings(**config["precision"]), update.lr)
    with pytest.raises(ValueError, match=r"must be its sequences 0\.\.\d+ in order"):
        probe_eval(policy, update, None, EvalBatch("eval_00", batch, 1.0), replace(plan, attribution=False))


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"forward_batch_size": 0}, r"forward_batch_size must be >= 1"),
        ({"head_budget_mib": 0}, r"head_budget_mib must be a finite number of MiB > 0"),
        ({"head_budget_mib": -4}, r"head_budget_mib must be a finite number of MiB > 0"),
        ({"head_budget_mib": float("nan")}, r"head_budget_mib must be a finite number of MiB > 0"),
    ],
)
def test_a_batch_size_below_one_or_an_empty_head_budget_is_refused_where_it_is_read(setting, message):
    with pytest.raises(ValueError, match=message):
        ProbeSettings(**setting)


@pytest.mark.parametrize("reference_eta", [0.0, -1e-4, float("inf"), float("nan")])
def test_a_reference_eta_that_is_not_a_positive_step_size_is_refused(reference_eta):
    # 0 was silently replaced by lr, a negative one flipped the sign of the eval x update matrix
    with pytest.raises(ValueError, match=r"probe.reference_eta must be a finite step size > 0, got .*leave it null"):
        ProbeSettings(reference_eta=reference_eta)


def test_the_rounding_error_is_the_part_of_the_step_the_parameters_dtype_loses():
    from probe.overrides import step_resolution

    def rounding_errors(theta, d, etas):
        return step_resolution(theta, d, etas).rounding_error

    d = {"w": torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)}
    # float32 weights of 1: a step of 1e-8 rounds away entirely, 1e-2 survives to float32 rounding (ulp 1.2e-7)
    errors = rounding_errors({"w": torch.ones(4, dtype=torch.float32)}, d, [1e-8, 1e-2])
    assert errors[0] == pytest.approx(1.0, rel=1e-12) and errors[1] < 1e-5
    assert rounding_errors({"w": torch.ones(4, dtype=torch.float64)}, d, [1e-8]) == [pytest.approx(0.0, abs=1e-7)]
    # one element of three carries almost the whole step and moves: most of the step is taken
    weighted = {"w": torch.tensor([1e-6, 1e-6, 0.0, 1.0], dtype=torch.float64)}
    (error,) = rounding_errors({"w": torch.tensor([1.0, 1.0, 5.0, 1e-4])}, weighted, [1e-3])
    assert error == pytest.approx(
        2e-9 / (1e-3 * (1 + 2e-6)), rel=0.1
    )  # the two tiny entries round away (+ 3%: 1.1e-3 rounded)
    assert math.isnan(rounding_errors({"w": torch.ones(4)}, {"w": torch.zeros(4)}, [1e-3])[0])
