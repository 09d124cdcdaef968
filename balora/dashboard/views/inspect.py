"""Inspect: per-layer imbalance, spectra and conditioning of adapter files; balance a copy. Layout only."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from balora.adapters import hub
from balora.dashboard import frames, inspect_plots, loaders, md, plots, report_frames, settings, uploads
from balora import safe_io
from balora.errors import InputError

st.title("Inspect an adapter")
st.caption(
    "Reads LoRA factors from files alone (no base model): a PEFT adapter folder, a Trainer output "
    "folder with checkpoint-N subfolders, diffusers, kohya and LyCORIS LoRA files, bare PEFT weights, "
    "or a Hugging Face Hub id user/name[@revision], a file or folder in it (user/name/file.safetensors) or its "
    "https://huggingface.co/... address. "
    "Nothing is written next to them: a balanced copy is offered as a download."
)

# What the page shows for paths: an upload is named by its file name, never by the server's
# temporary folder (upload_root), which stays None for a path typed by the user.
upload_root: Path | None = None
label = ""
hub_name: str | None = None  # a Hub id's repository name: its snapshot folder is only a commit hash
# persist_state: after a visit to another page the adapter shown before is shown again.
source = st.radio("Adapter", ["A path on this machine", "An uploaded file"], horizontal=True, key="insp_source",
                  persist_state="session")
if source == "A path on this machine":
    uploads.forget_upload()  # the user moved on from an upload: delete its temporary copy now
    text = st.text_input(
        "Path or Hub id", key="insp_path", persist_state="session",
        placeholder="/path/to/adapter  or  /path/to/lora.safetensors  or  user/name[@revision][/file.safetensors]",
    ).strip()
    if not text:
        st.info("Enter the path of an adapter folder, a Trainer output folder or a .safetensors file, or a Hugging "
                "Face Hub id (user/name or user/name@revision; user/name/file.safetensors for one file of it), "
                "then press Enter.")
        st.stop()
    try:  # a Hugging Face Hub id (or a file or folder in a Hub repository): through the Hub cache
        target = safe_io.user_path(text)
        ref = None if target.exists() else hub.parse_hub_ref(text)
        if ref is not None:
            with st.spinner(f"Fetching the adapter files of {text} (Hub cache)..."):
                target = loaders.hub_snapshot(text)
            # A whole repository's snapshot folder is a commit hash; a file or folder in it has its own name.
            hub_name = None if ref.path else ref.repo_id.split("/")[-1]
    except InputError as e:
        st.error(md.text(e))
        st.stop()
    if not target.exists():
        st.error(f"{md.code(target)}: no such file or folder on this machine (nor a Hub id `user/name`).")
        st.stop()
else:
    # on_change: a new file or the uploader's own remove button forgets the remembered upload first.
    up = st.file_uploader(
        f"Adapter file: .safetensors, or a .zip of an adapter or Trainer output folder (at most {settings.MAX_UPLOAD_MB} MB)",
        type=uploads.UPLOAD_TYPES, max_upload_size=settings.MAX_UPLOAD_MB, key="insp_upload",
        on_change=uploads.forget_upload,
    )
    # One temporary folder per uploaded file, kept while the session looks at it. Streamlit empties the
    # uploader when another page is shown: the upload remembered in session_state is shown again then.
    saved = st.session_state.get(uploads.SAVED_KEY)
    if saved and not Path(saved[2]).exists():  # pruned (a session idle for 12 h)
        uploads.forget_upload()
        saved = None
    if up is None and saved:
        a, b = st.columns([5, 1], vertical_alignment="center")
        a.caption(f"Showing {md.code(saved[3])}, uploaded earlier in this session. Upload another file to replace it.")
        b.button("Forget this upload", key="insp_upload_clear", on_click=uploads.forget_upload)
    elif up is None:
        st.info("Upload a file to inspect it.")
        st.stop()
    elif not saved or saved[0] != up.file_id:
        uploads.forget_upload()
        tmp = uploads.new_upload_dir()
        try:
            path = uploads.save_upload(up.name, up.getvalue(), tmp)
        except uploads.UploadError as e:
            uploads.remove_tree(tmp)
            st.error(md.text(e))
            st.stop()
        except Exception as e:  # anything unforeseen is still a message, and leaves nothing behind
            uploads.remove_tree(tmp)
            st.error(f"Could not read the upload: {type(e).__name__}: {md.text(uploads.redact(str(e), tmp, up.name))}")
            st.stop()
        st.session_state[uploads.SAVED_KEY] = saved = (up.file_id, str(tmp), str(path), up.name)
    target, upload_root, label = Path(saved[2]), Path(saved[1]), saved[3]


def shown(path) -> str:
    return uploads.shown_path(path, upload_root, label)


def clean(text: str) -> str:
    return uploads.redact(str(text), upload_root, label)


try:
    with st.spinner("Reading the adapter..."):
        df = loaders.inspect(target)
except InputError as e:
    st.error(md.text(clean(e)))
    st.stop()
except Exception as e:  # an unreadable or unexpected file is a message, never a traceback
    st.error(f"Could not read {md.code(shown(target))}: {type(e).__name__}: {md.text(clean(e))}")
    st.stop()
if df.empty:
    st.warning(f"No LoRA layers found in {md.code(shown(target))}.")
    st.stop()
sources = df.attrs.get("sources", [])
for note in report_frames.source_notes(sources):  # e.g. scaling unknown for bare weights: said up front
    st.warning(md.text(clean(note)))

ck = report_frames.checkpoints(df)
trainer = len(ck) > 1
if trainer:
    st.subheader(f"Across {len(ck)} checkpoints")
    a, b = st.columns([3, 1])
    value = a.selectbox("Quantity", ["rel_imbalance", "cond_dW", "sigma_max", "eff_rank", "norm_B", "norm_A"], format_func=plots.VALUE_LABELS.__getitem__, key="insp_ck_value")
    log_y = b.toggle("Log scale", value=value.startswith("cond"), key="insp_ck_log")
    st.plotly_chart(inspect_plots.across_checkpoints(df, value=value, log_y=log_y), key="fig_insp_ck")
    names = ck["checkpoint"].astype(str).tolist()
    chosen = st.selectbox("Checkpoint shown below", names, index=len(names) - 1, key="insp_ck")
    report = df[df["checkpoint"].astype(str) == chosen]
else:
    chosen = str(ck["checkpoint"].iloc[0]) if len(ck) else ""
    report = df

nums = report_frames.summary_numbers(report)
fmt = lambda v: "n/a" if v is None else f"{v:.3g}"  # noqa: E731
m1, m2, m3, m4 = st.columns(4)
m1.metric("LoRA layers", f"{nums['layers']}", help=f"{nums['layers'] - nums['measured']} could not be measured" if nums["measured"] < nums["layers"] else None)
m2.metric("Median relative imbalance", fmt(nums["median_rel_imbalance"]), help="0 = balanced, 1 = worst (PEFT's init)")
m3.metric("Worst relative imbalance", fmt(nums["worst_rel_imbalance"]))
m4.metric("Median cond(dW)", fmt(nums["median_cond_dW"]), help="σ₁/σ_r of dW; inf when σ_r is exactly 0, about 1e16 when dW is rank-deficient up to rounding")

st.subheader("Per-layer table")
table = report_frames.report_table(report)
st.dataframe(table, hide_index=True, placeholder=frames.NA_TEXT, key="insp_table")
st.download_button(
    "Download the table as CSV" + (" (all checkpoints)" if trainer else ""),
    (report_frames.report_table(df) if trainer else table).to_csv(index=False),
    file_name=f"{hub_name or target.stem}-layers.csv", mime="text/csv", key="insp_csv",
)
skipped = report_frames.skipped_layers(report)
if skipped:
    st.warning(f"{nums['layers'] - nums['measured']} layer(s) could not be measured: " + md.text("; ".join(skipped)))
notes = report_frames.layer_notes(report)
if notes:
    st.info("Some values could not be represented: " + md.text("; ".join(clean(n) for n in notes)))

ok = report_frames.measured(report)
st.subheader("By layer")
a, b, c = st.columns([3, 2, 1])
value = a.selectbox("Quantity", ["rel_imbalance", "imbalance", "eff_rank", "sigma_max", "norm_A", "norm_B"], format_func=plots.VALUE_LABELS.__getitem__, key="insp_value")
shown_n = [n for n in report_frames.TOP_N if n < len(ok)]
# Labels from dicts, never a function defined on this page: Streamlit keeps a widget's format_func for the
# session, and such a function holds the page's globals (the report, a balanced copy's bytes) after a page switch.
top_labels = {None: f"all {len(ok)}, in file order", **{n: f"the {n} largest" for n in shown_n}}
top = b.selectbox("Layers", list(top_labels), key="insp_top", format_func=top_labels.__getitem__)
log_x = c.toggle("Log scale", value=False, key="insp_log")
sub = f"the {top} layers with the largest value of {len(ok)}" if top else None
st.plotly_chart(inspect_plots.layer_bars(report_frames.worst_layers(ok, value, top), value=value, log_x=log_x, subtitle=sub), key="fig_insp_layers")
sub = f"the {top} layers with the largest cond(dW) of {len(ok)}" if top else None
st.plotly_chart(inspect_plots.conditioning_by_layer(report_frames.worst_layers(ok, "cond_dW", top), subtitle=sub), key="fig_insp_cond")

modules = ok["module"].astype(str).drop_duplicates().tolist()
if modules:
    a, b = st.columns([5, 1])
    layer = a.selectbox("Layer for the spectra", modules, key="insp_layer")
    # B = 0 (PEFT's init) has only zero singular values, which a log axis cannot draw: linear shows them.
    sv_log = b.toggle("Log scale", value=True, key="insp_sv_log")
    sv = report_frames.report_spectra(ok, layer)
    # Legend entries (adapter names from the file) are escaped by plots.singular_values itself: escaped
    # here as well, an adapter "q&a" read "q&amp;a".
    st.plotly_chart(plots.singular_values(sv, by="checkpoint", legend="checkpoint", log_y=sv_log, title=md.plot_label(f"Singular values of {layer}" + (f" ({chosen})" if chosen else ""))), key="fig_insp_sv")

with st.expander("Files read"):
    st.json([{**s, "path": shown(s.get("path", "")), "notes": [clean(n) for n in s.get("notes") or []]} for s in sources], expanded=False)

st.subheader("Balance")
src = uploads.balance_source(target, chosen if trainer else None)
src_name = hub_name if hub_name and src == target else src.name  # what the page and the download call it
st.caption(
    f"Writes a balanced copy of {md.code(src_name)} (same dW in every layer, B^T B = A A^T) in a temporary folder "
    "and offers it as a download. The original is not touched."
)
a, b = st.columns([2, 1])
method = a.radio(
    "Gauge", ["nearest", "svd"], horizontal=True, key="insp_method",
    format_func={"nearest": "nearest (closest balanced pair; keeps Adam's moments meaningful)", "svd": "svd (the paper's)"}.__getitem__,
)
if b.button("Balance", type="primary", key="insp_balance"):
    st.session_state["insp_balance_req"] = (str(src), method)
if st.session_state.get("insp_balance_req") == (str(src), method):
    try:
        with st.spinner("Balancing..."):
            result = uploads.balance(src, method, hub_name if src_name == hub_name else None)
    except InputError as e:
        st.error(md.text(clean(e)))
    except Exception as e:
        st.error(f"Could not balance {md.code(src_name)}: {type(e).__name__}: {md.text(clean(e))}")
    else:
        s = result.summary
        changes = s.changes.assign(source=s.changes["source"].map(shown))  # never the server's temporary folder
        unchanged = md.text(report_frames.unchanged_reasons(s.skipped, clean))
        done = s.changes[s.changes["action"] == "balanced"]
        if not s.balanced or ((done["dW_rel_change"] == 0).all() and not s.skipped):
            # The copy would equal the input (every pair skipped, or bf16/fp16 pairs already balanced and
            # left bit for bit): said so, and nothing to download.
            if not s.balanced:
                st.warning(f"Nothing was balanced in {md.code(src_name)}: every pair was left unchanged ({unchanged}).")
            else:
                st.info(f"Every pair of {md.code(src_name)} was already balanced to within its dtype's rounding and is "
                        "left as it is: the copy would equal the input, so none is offered.")
            st.dataframe(changes, hide_index=True, placeholder=frames.NA_TEXT, key="insp_changes")
            st.stop()
        st.success(f"Balanced {s.balanced} LoRA pair(s) of {md.code(src_name)} with the {method} gauge, in {s.seconds:.2f} s.")
        if s.skipped:
            st.info(f"{len(s.skipped)} pair(s) left unchanged: {unchanged}.")
        c1, c2, c3 = st.columns(3)
        c1.metric("Layers balanced", s.balanced, help=f"{len(s.skipped)} left unchanged" if s.skipped else None)
        # Over the balanced pairs only: with pairs left unchanged (B = 0: 1) it is not the file's worst, said above.
        of = " of the balanced pairs" if s.skipped else ""
        c2.metric(f"Worst relative imbalance{of} (before: {s.max_rel_imbalance_before:.3g})", f"{s.max_rel_imbalance_after:.2e}")
        c3.metric("Largest relative change of dW", f"{s.max_rel_error:.2e}", help="‖ΔdW‖_F / ‖dW‖_F, measured by re-reading the written file")
        st.plotly_chart(inspect_plots.balance_check(s.changes), key="fig_insp_balance")
        st.dataframe(changes, hide_index=True, placeholder=frames.NA_TEXT, key="insp_changes")
        for note in s.notes:
            st.info(md.text(clean(note)))
        # on_click="ignore": a click that reruns the page registers a new deferred id and drops the one the click is
        # fetching, so on a busy server the download failed ("Deferred file ... not found") after any widget change.
        st.download_button(f"Download {result.file_name}", result.for_button(), file_name=result.file_name, mime=result.mime,
                           type="primary", key="insp_download", on_click="ignore")
