"""Launch: start a small `balora compare` in the background and follow it. Layout only."""

from __future__ import annotations

from datetime import datetime

import streamlit as st

from balora.dashboard import jobs, settings
from balora.dashboard.app import page_path

RUNS_DIR = settings.runs_dir()
OPTIMIZERS = ["", "adam", "adamw", "sgd", "sign"]
TASK_HELP = {
    "synthetic": "a frozen random linear layer with LoRA fitted to a random target: seconds per cell",
    "lm": "a small GPT-2-style model pretrained here on generated text (once, about a minute or two, cached in "
          "the runs folder's .cache unless $BALORA_CACHE is set), LoRA fine-tuned on a new task: minutes, no download",
}


def _floats(text: str, what: str) -> list[float]:
    # Split on commas only: removing every space first read "8 32" as 832, which `balora compare` refuses.
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise jobs.JobError(f"{what}: give numbers separated by commas, e.g. 1e-3,1e-2") from None


st.title("Launch a comparison")
st.caption(
    f"Runs `balora compare` in the background and writes the run under `{RUNS_DIR}` (your runs folder, the one "
    f"`balora compare` uses; nowhere else, never into the bundled samples). "
    f"One job at a time; sizes are bounded so that a job takes minutes on a laptop CPU."
)
manager = jobs.get_manager(RUNS_DIR)
job = manager.job


def job_panel() -> None:
    j = manager.job
    if j is None:
        return
    state = j.state()
    name = j.spec.name
    if state in ("starting", "running"):
        prog = jobs.read_status(j.run_dir).get("progress") or {}
        done, total = int(prog.get("done") or 0), int(prog.get("total") or 0)
        sdone, stotal = int(prog.get("steps_done") or 0), int(prog.get("steps_total") or 0)
        # Cells are the unit the runner reports reliably; steps refine it when it records them.
        frac = sdone / stotal if stotal and sdone else (done / total if total else 0.0)
        text = f"{name}: {done}/{total} cells" + (f", {sdone}/{stotal} steps" if stotal and sdone else "") if total else f"{name}: starting..."
        st.progress(min(max(frac, 0.0), 1.0), text=text)
        if st.button("Cancel the job", key="launch_cancel"):
            manager.cancel()
            st.rerun()
        st.caption("The run is already visible in Compare, marked in progress.")
    elif state == "completed":
        st.success(f"Run **{name}** finished.")
        if st.button("Open it in Compare", type="primary", key="launch_open"):
            st.session_state["compare_focus"] = name
            st.switch_page(page_path("compare.py"))
    elif state == "cancelled":
        # Cancelled while still starting (imports, building the task): no run folder was written.
        st.warning(f"Run **{name}** was cancelled; what it wrote is kept and marked interrupted." if j.run_dir.exists()
                   else f"Run **{name}** was cancelled before it wrote anything: there is no run to open.")
    else:
        st.error(f"Run **{name}** failed ({jobs.how_it_ended(j.returncode)}). Its last output is below.")
    if j.output:
        with st.expander("Output", expanded=state == "failed"):
            st.code(j.tail(30), language="text")
    # The job as a shell command that runs exactly as shown (wrapped: nothing cut off).
    st.code(j.shown, language="bash", wrap_lines=True)


if job is not None:
    st.subheader("Current job" if job.running else "Last job")
    if job.running:
        # Poll the job every 2 s; when it ends, rerun the whole page so the form unlocks.
        @st.fragment(run_every=2)
        def _live():
            if not manager.job.running:
                st.rerun()
            job_panel()

        _live()
    else:
        job_panel()

st.subheader("New comparison")
busy = jobs.any_running()
task = st.radio("Task", list(settings.LAUNCH_TASKS), horizontal=True, key="launch_task", help="\n".join(f"{k}: {v}" for k, v in TASK_HELP.items()))
st.caption(TASK_HELP[task])
try:
    arms = jobs.available_arms()
except Exception as e:  # the arm registry failed to import: say so, keep the page usable
    st.error(f"Could not list the arms: {e}")
    st.stop()
max_steps = settings.LAUNCH_MAX_STEPS[task]
# A fresh default name per task and after each start; whatever the user types is kept across reruns.
if st.session_state.get("launch_name_for") != task:
    st.session_state["launch_name"] = f"{task}-{datetime.now():%Y%m%d-%H%M%S}"
    st.session_state["launch_name_for"] = task
with st.form("launch_form"):
    a, b = st.columns(2)
    chosen = a.multiselect("Arms", list(arms), default=[x for x in ("lora", "balora") if x in arms], help="\n".join(f"{k}: {v}" for k, v in arms.items()))
    seeds = b.slider("Seeds", 1, settings.LAUNCH_MAX_SEEDS, 2 if task == "synthetic" else 1)
    c, d = st.columns(2)
    steps = c.number_input("Steps per cell", min_value=1, max_value=max_steps, value=min(100, max_steps), step=10)
    optimizer = d.selectbox("Optimizer", OPTIMIZERS, format_func={o: o or "task default" for o in OPTIMIZERS}.__getitem__)  # not a page function: kept for the session
    e, f = st.columns(2)
    lrs = e.text_input("Learning rates (comma-separated, empty: task default)", placeholder="1e-3,1e-2", help=f"at most {settings.LAUNCH_MAX_GRID}")
    alphas = f.text_input("Alphas (comma-separated, empty: task default)", placeholder="8,32", help=f"at most {settings.LAUNCH_MAX_GRID}")
    init_scale = None
    if task == "synthetic":
        init_scale = st.number_input(
            "Initial scale of A", min_value=0.1, max_value=settings.LAUNCH_MAX_INIT_SCALE, value=1.0, step=1.0,
            key="launch_init_scale",
            help="Multiplies PEFT's initial lora_A (1 = PEFT's own init). Balancing helps most when A starts "
                 "large next to the target (try 10): plain LoRA then stalls inside A's random row space.",
        )
    # persist_state: a visit to another page keeps the name (it was dropped, and Start then refused an empty name).
    name = st.text_input("Run name", key="launch_name", persist_state="session", help=f"the run is written to {RUNS_DIR}/NAME")
    submitted = st.form_submit_button("Start", type="primary", disabled=busy is not None)
if busy is not None:
    st.info(f"A job is running ({busy.spec.name}); start another when it ends.")
if submitted:
    try:
        spec = jobs.LaunchSpec(task=task, arms=chosen, seeds=int(seeds), steps=int(steps), optimizer=optimizer or None,
                               lrs=_floats(lrs, "learning rates"), alphas=_floats(alphas, "alphas"), name=name.strip(),
                               init_scale=None if init_scale in (None, 1.0) else float(init_scale))
        manager.start(spec)
    except jobs.JobError as err:
        st.error(str(err))
    except OSError as err:
        st.error(f"Could not start the job: {err}")
    else:
        st.session_state.pop("launch_name_for", None)
        st.rerun()
