"""RunRecorder: a tiny Trainer run is written in the run-store format and load_run reads it back."""

import atexit
import math

import numpy as np

import pytest
import torch

pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from balora import BalanceCallback  # noqa: E402
from balora.errors import InputError  # noqa: E402
from balora.recorder import RunRecorder  # noqa: E402
from balora.store import load_run  # noqa: E402


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(tmp_path, out, callbacks_for, max_steps=6, lr=5e-2, evaluate=True):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]))
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=max_steps, per_device_train_batch_size=4,
        learning_rate=lr, logging_steps=2, eval_strategy="steps" if evaluate else "no", eval_steps=3, report_to=[],
        save_strategy="no", use_cpu=True, seed=3, disable_tqdm=True,
    )
    callbacks = callbacks_for(out)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(24, 8, 32, 0),
                      eval_dataset=TokenData(8, 8, 32, 1), callbacks=callbacks)
    trainer.train()
    return trainer, callbacks


def test_trainer_run_is_recorded(tmp_path):
    out = tmp_path / "run"
    trainer, _ = _train(tmp_path, out, lambda o: [RunRecorder(o, layers_every=2, spectra_every=3)])
    run = load_run(out)
    assert run.status == "completed" and not run.warnings
    assert run.config["source"] == "RunRecorder" and run.config["lrs"] == [5e-2] and run.config["alphas"] == [4.0]
    assert run.config["optimizer"] == trainer.args.optim.value  # its name ("adamw_torch_fused"), not the enum's repr

    history = trainer.state.log_history
    logged = {h["step"]: h["loss"] for h in history if "loss" in h}
    evals = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    steps = run.steps.set_index("step")
    assert set(steps.index) == set(logged) | set(evals)  # one row per logged step, train and eval merged
    for step, loss in logged.items():
        assert steps.loc[step, "loss"] == pytest.approx(loss)
    for step, loss in evals.items():
        assert steps.loc[step, "eval_loss"] == pytest.approx(loss)
    assert (run.steps["arm"] == "trainer").all() and (run.steps["seed"] == 3).all()
    assert run.steps["time_s"].is_monotonic_increasing

    # layers: before training, every 2 steps, and the last step; 2 LoRA modules each time
    assert sorted(run.layers["step"].unique()) == [0, 2, 4, 6]
    assert (run.layers.groupby("step").size() == 2).all()
    init = run.layers[run.layers["step"] == 0]
    assert (init["rel_imbalance"] == 1.0).all()  # PEFT's B = 0 init
    assert sorted(run.spectra["step"].unique()) == [0, 3, 6]
    assert set(run.spectra["which"]) == {"dW", "A", "B"}
    assert len(run.spectra[(run.spectra["step"] == 3) & (run.spectra["which"] == "dW")]) == 2 * 2  # 2 modules x r

    (summary,) = run.summary.to_dict("records")
    assert summary["status"] == "completed" and summary["steps_done"] == 6
    assert summary["final_loss"] == pytest.approx(logged[max(logged)])
    assert summary["final_eval_loss"] == pytest.approx(evals[max(evals)])
    last = run.layers[run.layers["step"] == 6]["rel_imbalance"].max()
    assert summary["final_rel_imbalance_max"] == pytest.approx(last)


@pytest.mark.parametrize("layers_every,evaluate", [(2, True), (0, True), (10, False)])
def test_a_run_that_went_to_nan_is_diverged_not_a_zero_loss(tmp_path, layers_every, evaluate):
    # The Trainer logs NaN training losses as finite stand-ins (logging_nan_inf_filter: 0.0 here), so
    # the recorder reads divergence from the logged gradient norm, the eval losses and the factors too.
    out = tmp_path / "run"
    trainer, _ = _train(tmp_path, out, lambda o: [RunRecorder(o, layers_every=layers_every, target_loss=1.0)], lr=1e30,
                        evaluate=evaluate)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(v) for v in logged) and min(logged) == 0.0  # what the Trainer handed over
    (summary,) = load_run(out).summary.to_dict("records")
    assert summary["status"] == "diverged" and "non-finite" in summary["reason"]
    assert not summary["final_loss"] == 0.0 and math.isnan(summary["steps_to_target"])  # no target "reached" at 0.0


def test_a_diverged_run_keeps_no_stand_in_losses_in_its_steps(tmp_path):
    # The summary left the Trainer's stand-ins (0.0 once every loss is NaN) out, but the steps table kept
    # them: the dashboard drew the diverged run's loss falling to 0 and its Speed-up view had it reach any
    # target first. A loss logged with or after a non-finite gradient norm is no measurement.
    out = tmp_path / "run"
    trainer, _ = _train(tmp_path, out, lambda o: [RunRecorder(o, layers_every=10)], lr=1e30, evaluate=False)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    first_bad = min(h["step"] for h in logged if not math.isfinite(h["grad_norm"]))
    assert any(h["loss"] == 0.0 and h["step"] >= first_bad for h in logged)  # the case: stand-ins handed over
    steps = load_run(out).steps
    assert steps.loc[steps["step"] >= first_bad, "loss"].isna().all()
    from balora.dashboard import frames

    speed = frames.speedups(frames.combine({"r": steps}), 1.0, reference="trainer")
    assert speed["reached"].eq(0).all()


class _NoGradNorm(TrainerCallback):
    """Hands the callbacks after it logs without grad_norm, as transformers 4.x does with max_grad_norm=0
    (it logged the norm only when it clipped); the Trainer's log_history keeps it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs.pop("grad_norm", None)


def test_a_diverged_run_without_a_logged_gradient_norm_keeps_no_stand_in_losses(tmp_path):
    # Without a gradient norm in the logs the recorder saw no sign of divergence before its next
    # diagnostics (layers_every: 50 by default), and the steps table kept the stand-ins (0.0) up to there.
    out = tmp_path / "run"
    trainer, _ = _train(tmp_path, out, lambda o: [_NoGradNorm(), RunRecorder(o)], max_steps=12, lr=1e30, evaluate=False)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    first_bad = min(h["step"] for h in logged if not math.isfinite(h["grad_norm"]))
    assert any(h["loss"] == 0.0 for h in logged)  # the case: stand-ins handed over
    run = load_run(out)
    assert run.steps.loc[run.steps["step"] >= first_bad, "loss"].isna().all()
    assert run.summary["status"].tolist() == ["diverged"]


def test_recorder_with_balancing_shows_balanced_layers(tmp_path):
    out = tmp_path / "run"

    def callbacks(o):
        balance = BalanceCallback(log_diagnostics=False)
        return [balance, RunRecorder(o, arm="balora", layers_every=3, balance_callback=balance)]

    _train(tmp_path, out, callbacks)
    run = load_run(out)
    final = run.layers[run.layers["step"] == 6]
    assert final["rel_imbalance"].max() < 1e-4
    assert run.summary.loc[0, "arm"] == "balora"
    assert run.summary.loc[0, "balance_seconds"] > 0
    assert math.isnan(run.summary.loc[0, "speedup_steps"])


def test_target_from_eval_and_force_over_an_earlier_recording(tmp_path):
    from balora.errors import InputError

    out = tmp_path / "run"
    _train(tmp_path, out, lambda o: [RunRecorder(o, layers_every=0)])
    first = load_run(out).steps["eval_loss"].dropna()
    target = float(first.mean())  # between the first and the last eval loss
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):  # no force: the earlier recording is kept
        _train(tmp_path, out, lambda o: [RunRecorder(o, layers_every=0, target_loss=target)])

    trainer, _ = _train(tmp_path, out, lambda o: [RunRecorder(o, layers_every=0, target_loss=target, force=True)])
    run = load_run(out)
    assert (out / "notes.txt").read_text() == "mine"  # --force deletes only what balora wrote
    evals = [(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]
    expected = next(step for step, loss in evals if loss <= target)
    (summary,) = run.summary.to_dict("records")
    assert summary["target_on"] == "eval_loss" and summary["steps_to_target"] == expected
    assert summary["seconds_to_target"] == pytest.approx(run.steps.set_index("step").loc[expected, "time_s"])


def _train_saving(tmp_path, out, max_steps, resume=False, lr=5e-2):
    """_train's model and data without dropout (a resumed run draws other dropout masks), a constant
    learning rate and a checkpoint every 3 steps, balancing on."""
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]))
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=max_steps, per_device_train_batch_size=4,
        learning_rate=lr, lr_scheduler_type="constant", logging_steps=1, eval_strategy="steps", eval_steps=2,
        report_to=[], save_strategy="steps", save_steps=3, use_cpu=True, seed=3, disable_tqdm=True,
    )
    balance = BalanceCallback(log_diagnostics=False)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(24, 8, 32, 0), eval_dataset=TokenData(8, 8, 32, 1),
                      callbacks=[balance, RunRecorder(out, arm="balora", layers_every=2, balance_callback=balance)])
    trainer.train(resume_from_checkpoint=resume or None)
    return load_run(out)


def test_a_resumed_trainer_run_goes_on_in_the_same_run(tmp_path):
    """Stopped after 3 steps (checkpoint-3), resumed to 6: the run folder ends as an uninterrupted
    6-step run's, step for step (losses, evals, layer reports), with one summary; it used to be
    refused (the folder exists), or with force wiped, the checkpoint's factors recorded as step 0."""
    whole = _train_saving(tmp_path / "a", tmp_path / "a" / "run", 6)
    _train_saving(tmp_path / "b", tmp_path / "b" / "run", 3)
    resumed = _train_saving(tmp_path / "b", tmp_path / "b" / "run", 6, resume=True)
    assert resumed.status == "completed" and not resumed.warnings and resumed.config["steps"] == 6
    cols = ["step", "loss", "eval_loss"]
    a, b = whole.steps[cols].sort_values("step"), resumed.steps[cols].sort_values("step")
    assert list(a["step"]) == list(b["step"]) == [1, 2, 3, 4, 5, 6]
    assert np.allclose(a["loss"], b["loss"], rtol=1e-6)
    # Evals agree step for step; the stopped run's own final eval (step 3) is kept, as it happened.
    evals = a.set_index("step")["eval_loss"].dropna()
    assert list(evals.index) == [2, 4, 6] and b.set_index("step")["eval_loss"].dropna().index.tolist() == [2, 3, 4, 6]
    assert np.allclose(evals, b.set_index("step")["eval_loss"].loc[evals.index], rtol=1e-6)
    la, lb = (r.layers.sort_values(["step", "module"]) for r in (whole, resumed))
    assert sorted(set(la["step"])) == [0, 2, 4, 6] and sorted(set(lb["step"])) == [0, 2, 3, 4, 6]  # 3: the stop
    assert (lb[lb["step"] == 0]["rel_imbalance"] == 1.0).all()  # step 0 is the real start, B = 0
    lb = lb[lb["step"] != 3]
    assert list(la["module"]) == list(lb["module"])
    assert np.allclose(la["norm_B"], lb["norm_B"], rtol=1e-5)
    (sa,), (sb,) = whole.summary.to_dict("records"), resumed.summary.to_dict("records")
    assert sb["steps_done"] == 6 and sb["final_loss"] == pytest.approx(sa["final_loss"], rel=1e-6)
    assert sb["total_seconds"] >= resumed.steps["time_s"].max() > resumed.steps.set_index("step").loc[3, "time_s"]


def test_resuming_from_an_earlier_checkpoint_or_another_cell(tmp_path):
    """Resumed from checkpoint-3 of a run recorded to step 6: rows after 3 are recorded again, and the
    balancing time of the earlier process (which ran past the checkpoint) is unknown, not counted
    twice. A folder holding another cell's run (here another lr) is not continued: refused."""
    _train_saving(tmp_path, tmp_path / "run", 6)
    again = _train_saving(tmp_path, tmp_path / "run", 6, resume=str(tmp_path / "trainer" / "checkpoint-3"))
    assert sorted(again.steps["step"]) == [1, 2, 3, 4, 5, 6] and not again.steps["step"].duplicated().any()
    (row,) = again.summary.to_dict("records")
    assert row["steps_done"] == 6 and math.isnan(row["balance_seconds"]) and math.isnan(row["diag_seconds"])
    with pytest.raises(InputError, match="directory exists and is not empty"):
        _train_saving(tmp_path, tmp_path / "run", 6, resume=str(tmp_path / "trainer" / "checkpoint-3"), lr=1e-2)


class Killed(BaseException):
    """The training process killed (kill -9, the OOM killer): no callback, no atexit runs after it."""


def _train_killed_and_resumed(tmp_path, out, max_steps, kill_after=None, resume=False):
    """logging_steps = save_steps (as the Trainer's defaults, 500 and 500): every checkpoint is taken at a
    log step. kill_after: the process dies at the end of that step (after the checkpoint before it)."""
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]))
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=5e-2,
        lr_scheduler_type="constant", logging_steps=2, eval_strategy="no", report_to=[], save_strategy="steps",
        save_steps=2, use_cpu=True, seed=3, disable_tqdm=True,
    )
    recorder = RunRecorder(out, layers_every=2)

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill_after:
                atexit.unregister(recorder._at_exit)  # a killed process writes nothing more
                raise Killed

    trainer = Trainer(model=model, args=args, train_dataset=TokenData(24, 8, 32, 0), callbacks=[recorder, Kill()])
    try:
        trainer.train(resume_from_checkpoint=resume or None)
    except Killed:
        return None
    return trainer


def test_a_run_killed_after_a_checkpoint_resumes_from_it(tmp_path):
    """Killed one step after checkpoint-4 (its step logged, its row not written yet: the recorder writes a
    step's row when the next log comes), then resumed: the run goes on from the checkpoint, each logged
    step once with the Trainer's loss. It was refused ("directory exists and is not empty") whenever the
    kill came before the next log, so always with logging_steps = save_steps."""
    whole = _train_killed_and_resumed(tmp_path / "a", tmp_path / "a" / "run", 8)
    assert _train_killed_and_resumed(tmp_path / "b", tmp_path / "b" / "run", 8, kill_after=5) is None
    resumed = _train_killed_and_resumed(tmp_path / "b", tmp_path / "b" / "run", 8, resume=True)
    run = load_run(tmp_path / "b" / "run")
    assert run.status == "completed" and not run.warnings
    logged = {h["step"]: h["loss"] for h in whole.state.log_history if "loss" in h}
    assert {h["step"] for h in resumed.state.log_history if "loss" in h} == set(logged) == {2, 4, 6, 8}
    steps = run.steps.set_index("step").sort_index()
    assert list(steps.index) == sorted(logged)
    assert np.allclose(steps["loss"], [logged[s] for s in steps.index], rtol=1e-4)
    assert sorted(set(run.layers["step"])) == [0, 2, 4, 6, 8] and len(run.summary) == 1


@pytest.mark.parametrize("strategy,eval_steps", [("epoch", None), ("steps", 0.25), ("steps", 3)])
def test_config_says_how_often_the_trainer_evaluated(tmp_path, strategy, eval_steps):
    # config.json's eval_every was logging_steps for per-epoch evaluation and 0 for a fractional eval_steps.
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]))
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), num_train_epochs=2, per_device_train_batch_size=4, logging_steps=1,
        eval_strategy=strategy, eval_steps=eval_steps, report_to=[], save_strategy="no", use_cpu=True,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(16, 8, 32, 0),
                      eval_dataset=TokenData(4, 8, 32, 1), callbacks=[RunRecorder(tmp_path / "run", layers_every=0)])
    trainer.train()
    # the Trainer's evaluations, less the one it may add at the last step
    evals = [h["step"] for h in trainer.state.log_history if "eval_loss" in h and h["step"] < trainer.state.max_steps]
    recorded = load_run(tmp_path / "run").config["eval_every"]
    if strategy == "epoch":  # no fixed number of steps between evaluations
        assert recorded is None
    else:
        assert recorded == evals[0] and set(np.diff(evals)) <= {recorded}


class _LastFactors(TrainerCallback):
    """The LoRA factors at the end of every step, as float64 numpy (module -> (A, B))."""

    def __init__(self):
        self.at = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = {
            name.removeprefix("base_model.model."): (m.lora_A["default"].weight.detach().double().numpy(),
                                                     m.lora_B["default"].weight.detach().double().numpy())
            for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def _train_to_best_checkpoint(tmp_path, max_steps, layers_every, *callbacks):
    """A tiny GPT-2 LoRA Trainer that evaluates and saves every 2 steps with load_best_model_at_end (the
    best being an early checkpoint: greater_is_better on eval_loss), recorded by a RunRecorder; trained.
    Returns the trainer and the factors at the end of every step (_LastFactors.at)."""
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]))
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=5e-2,
        logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
        report_to=[], use_cpu=True, seed=3, disable_tqdm=True)
    factors, recorder = _LastFactors(), RunRecorder(tmp_path / "run", layers_every=layers_every)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(24, 8, 32, 0),
                      eval_dataset=TokenData(8, 8, 32, 1), callbacks=[factors, recorder, *callbacks])
    trainer.train()
    return trainer, factors.at


def test_the_last_step_is_recorded_before_the_trainer_reloads_the_best_checkpoint(tmp_path):
    """load_best_model_at_end puts an earlier checkpoint's factors back before on_train_end, where the
    last step's layer report was taken: the run showed that checkpoint's imbalance and norms as the
    last step's, and its summary's final_rel_imbalance_max was that checkpoint's."""
    trainer, factors = _train_to_best_checkpoint(tmp_path, 6, 4)
    assert not trainer.state.best_model_checkpoint.endswith("checkpoint-6")  # the reload changed the factors

    run = load_run(tmp_path / "run")
    assert sorted(run.layers["step"].unique()) == [0, 4, 6]
    last = run.layers[run.layers["step"] == 6].set_index("module")
    assert sorted(last.index) == sorted(factors[6])
    for module, (A, B) in factors[6].items():
        grams = A @ A.T, B.T @ B
        rel = np.linalg.norm(grams[1] - grams[0]) / (np.linalg.norm(grams[0]) + np.linalg.norm(grams[1]))
        assert last.loc[module, "rel_imbalance"] == pytest.approx(rel, rel=1e-5), module
        assert last.loc[module, "norm_B"] == pytest.approx(np.linalg.norm(B), rel=1e-5), module
    assert run.summary.loc[0, "final_rel_imbalance_max"] == pytest.approx(last["rel_imbalance"].max())


@pytest.mark.parametrize("layers_every", [3, 0])
def test_an_early_stopped_run_records_its_last_step_before_the_best_checkpoint_comes_back(tmp_path, layers_every):
    """EarlyStoppingCallback needs load_best_model_at_end, which puts an earlier checkpoint's factors back
    before on_train_end: the step the run stopped at was never recorded (layers at 0 and 3 for a stop at
    4), and the summary's final_rel_imbalance_max was an earlier step's (step 0's 1.0 with layers_every=0)."""
    from transformers import EarlyStoppingCallback

    trainer, factors = _train_to_best_checkpoint(tmp_path, 20, layers_every,
                                                 EarlyStoppingCallback(early_stopping_patience=1))
    stop = trainer.state.global_step
    assert stop < 20 and stop % 3 and not trainer.state.best_model_checkpoint.endswith(f"checkpoint-{stop}")

    run = load_run(tmp_path / "run")
    rels = []
    for A, B in factors[stop].values():
        grams = A @ A.T, B.T @ B
        rels.append(np.linalg.norm(grams[1] - grams[0]) / (np.linalg.norm(grams[0]) + np.linalg.norm(grams[1])))
    assert run.summary.loc[0, "final_rel_imbalance_max"] == pytest.approx(max(rels), rel=1e-5)
    if layers_every:
        assert sorted(run.layers["step"].unique()) == [0, 3, stop]
        last = run.layers[run.layers["step"] == stop]
        assert last["rel_imbalance"].max() == pytest.approx(max(rels), rel=1e-5)


@pytest.mark.parametrize("adapter", ["none", "ia3"])
def test_a_trainer_run_without_a_lora_adapter_is_recorded(tmp_path, adapter):
    """A full fine-tune recorded as a baseline (or another PEFT method) had no lora_alpha: the run's config
    held "alphas": [null], which load_run refused as damaged (listed so by the dashboard), and an IA3 model
    stopped the Trainer with a TypeError before its first step."""
    from peft import IA3Config

    from balora.records import arm_summary
    from balora.store import list_runs

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    if adapter == "ia3":
        model = get_peft_model(model, IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"]))
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(16, 8, 32, 0),
                      callbacks=[RunRecorder(tmp_path / "run", arm="baseline", layers_every=2)])
    trainer.train()
    run = load_run(tmp_path / "run")
    assert run.status == "completed" and not run.warnings
    assert list_runs(tmp_path).set_index("name").loc["run", "status"] == "completed"
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert run.steps.set_index("step")["loss"].to_dict() == logged
    assert len(run.layers) == 0  # no LoRA pair to report
    (row,) = arm_summary(run.summary).to_dict("records")
    assert row["arm"] == "baseline" and row["completed"] == 1 and row["best"] == logged[4]


def test_a_run_resumed_in_the_same_process_forgets_the_interrupted_training(tmp_path):
    """In a notebook: training blows up after checkpoint-6, the user stops it (Ctrl-C) and resumes from that
    checkpoint with the same Trainer and RunRecorder. The recorder kept the interrupted training's state (its
    losses, its held row, its signs of divergence), so the resumed run, finite throughout, was summarised
    as diverged."""
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]))
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=8, per_device_train_batch_size=4, learning_rate=5e-2,
        lr_scheduler_type="constant", logging_steps=1, eval_strategy="no", report_to=[], save_strategy="steps",
        save_steps=6, use_cpu=True, seed=3, disable_tqdm=True,
    )
    recorder = RunRecorder(tmp_path / "run", layers_every=1)

    class BlowUp(TrainerCallback):  # before the recorder: its diagnostics see the factors go non-finite
        armed = True

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if self.armed and state.global_step == 7:  # after checkpoint-6
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(math.nan)
                self.armed = False

    class Stop(TrainerCallback):  # after the recorder has logged step 7: Ctrl-C
        armed = True

        def on_log(self, args, state, control, **kwargs):
            if self.armed and state.global_step == 7:
                self.armed = False
                raise KeyboardInterrupt

    trainer = Trainer(model=model, args=args, train_dataset=TokenData(40, 8, 32, 0),
                      callbacks=[BlowUp(), recorder, Stop()])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.train(resume_from_checkpoint=True)
    run = load_run(tmp_path / "run")
    assert run.status == "completed" and not run.warnings
    (summary,) = run.summary.itertuples()
    assert summary.status == "completed", summary.reason
    logged = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    steps = run.steps.set_index("step").sort_index()
    assert list(steps.index) == list(range(1, 9)) and steps["loss"].notna().all()
    assert np.allclose(steps.loc[7:, "loss"], [logged[s] for s in (7, 8)], rtol=1e-4)
    assert math.isfinite(summary.final_loss)
