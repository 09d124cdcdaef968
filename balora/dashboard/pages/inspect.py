"""Inspect: per-layer imbalance, spectra and conditioning of adapter files; balance a copy. Layout only."""

from __future__ import annotations

import tempfile
from pathlib import Path

import streamlit as st

from balora.errors import InputError
from balora.dashboard import data, plots, settings

st.title("Inspect an adapter")
st.caption(
    "Reads LoRA factors from files alone (no base model): a PEFT adapter folder, a Trainer output "
    "folder with checkpoint-N subfolders, a kohya LoRA .safetensors, or bare PEFT weights. "
    "Nothing is written next to them: a balanced copy is offered as a download."
)

source = st.radio("Adapter", ["A path on this machine", "An uploaded file"], horizontal=True, key="insp_source")
target: Path | None = None
if source == "A path on this machine":
    saved = st.session_state.pop("insp_saved", None)
    if saved:  # the user moved on from an upload: delete its temporary copy now
        data.remove_tree(Path(saved[1]))
    text = st.text_input(
        "Path", key="insp_path", placeholder="/path/to/adapter  or  /path/to/trainer-output  or  /path/to/lora.safetensors",
    ).strip()
    if not text:
        st.info("Enter the path of an adapter folder, a Trainer output folder or a .safetensors file, then press Enter.")
        st.stop()
    target = Path(text).expanduser()
    if not target.exists():
        st.error(f"`{target}`: no such file or folder on this machine.")
        st.stop()
else:
    up = st.file_uploader(
        f"Adapter file: .safetensors, or a .zip of an adapter or Trainer output folder (at most {settings.MAX_UPLOAD_MB} MB)",
        type=data.UPLOAD_TYPES, max_upload_size=settings.MAX_UPLOAD_MB, key="insp_upload",
    )
    if up is None:
        st.info("Upload a file to inspect it.")
        st.stop()
    # One temporary folder per uploaded file, kept while the session looks at it.
    saved = st.session_state.get("insp_saved")
    if not saved or saved[0] != up.file_id:
        if saved:
            data.remove_tree(Path(saved[1]))
        tmp = Path(tempfile.mkdtemp(prefix="balora-upload-"))
        try:
            path = data.save_upload(up.name, up.getvalue(), tmp)
        except data.UploadError as e:
            data.remove_tree(tmp)
            st.session_state.pop("insp_saved", None)
            st.error(str(e))
            st.stop()
        st.session_state["insp_saved"] = saved = (up.file_id, str(tmp), str(path))
    target = Path(saved[2])

try:
    with st.spinner("Reading the adapter..."):
        df = data.inspect(target)
except InputError as e:
    st.error(str(e))
    st.stop()
except Exception as e:  # an unreadable or unexpected file is a message, never a traceback
    st.error(f"Could not read `{target.name}`: {type(e).__name__}: {e}")
    st.stop()
if df.empty:
    st.warning(f"No LoRA layers found in `{target}`.")
    st.stop()

ck = data.checkpoints(df)
trainer = len(ck) > 1
if trainer:
    st.subheader(f"Across {len(ck)} checkpoints")
    a, b = st.columns([3, 1])
    value = a.selectbox("Quantity", ["rel_imbalance", "cond_dW", "sigma_max", "eff_rank", "norm_B", "norm_A"], format_func=lambda v: plots.VALUE_LABELS[v], key="insp_ck_value")
    log_y = b.toggle("Log scale", value=value.startswith("cond"), key="insp_ck_log")
    st.plotly_chart(plots.across_checkpoints(df, value=value, log_y=log_y), key="fig_insp_ck")
    names = ck["checkpoint"].astype(str).tolist()
    chosen = st.selectbox("Checkpoint shown below", names, index=len(names) - 1, key="insp_ck")
    report = df[df["checkpoint"].astype(str) == chosen]
else:
    chosen = str(ck["checkpoint"].iloc[0]) if len(ck) else ""
    report = df

ok = report[report["status"] == "ok"]
m1, m2, m3, m4 = st.columns(4)
m1.metric("LoRA layers", f"{len(report)}", help=f"{len(report) - len(ok)} could not be measured" if len(ok) < len(report) else None)
m2.metric("Median relative imbalance", f"{ok['rel_imbalance'].median():.3g}" if len(ok) else "n/a", help="0 = balanced, 1 = worst (PEFT's init)")
m3.metric("Worst relative imbalance", f"{ok['rel_imbalance'].max():.3g}" if len(ok) else "n/a")
m4.metric("Median cond(dW)", f"{ok['cond_dW'].median():.3g}" if len(ok) else "n/a", help="σ₁/σ_r of dW; inf when rank-deficient")

st.subheader("Per-layer table")
table = data.report_table(report)
st.dataframe(table, hide_index=True, key="insp_table")
st.download_button(
    "Download the table as CSV" + (" (all checkpoints)" if trainer else ""), data.report_table(df).to_csv(index=False),
    file_name=f"{target.stem}-layers.csv", mime="text/csv", key="insp_csv",
)
skipped = report[report["status"] != "ok"]
if len(skipped):
    st.warning(f"{len(skipped)} layer(s) could not be measured: " + "; ".join(f"{m}: {s}" for m, s in zip(skipped["module"].head(5), skipped["status"].head(5))))

st.subheader("By layer")
a, b = st.columns([3, 1])
value = a.selectbox("Quantity", ["rel_imbalance", "imbalance", "eff_rank", "sigma_max", "norm_A", "norm_B"], format_func=lambda v: plots.VALUE_LABELS[v], key="insp_value")
log_x = b.toggle("Log scale", value=False, key="insp_log")
st.plotly_chart(plots.layer_bars(ok, value=value, log_x=log_x), key="fig_insp_layers")
st.plotly_chart(plots.conditioning_by_layer(ok), key="fig_insp_cond")

modules = ok["module"].astype(str).drop_duplicates().tolist()
if modules:
    layer = st.selectbox("Layer for the spectra", modules, key="insp_layer")
    sv = data.report_spectra(ok, layer)
    st.plotly_chart(plots.singular_values(sv, by="checkpoint", legend="checkpoint", title=f"Singular values of {layer}" + (f" ({chosen})" if chosen else "")), key="fig_insp_sv")

with st.expander("Files read"):
    st.json(df.attrs.get("sources", []), expanded=False)

st.subheader("Balance")
src = data.balance_source(df, target, chosen if trainer else None)
st.caption(
    f"Writes a balanced copy of `{src.name}` (same dW in every layer, B^T B = A A^T) in a temporary folder "
    "and offers it as a download. The original is not touched."
)
a, b = st.columns([2, 1])
method = a.radio(
    "Gauge", ["nearest", "svd"], horizontal=True, key="insp_method",
    format_func=lambda m: {"nearest": "nearest (closest balanced pair; keeps Adam's moments meaningful)", "svd": "svd (the paper's)"}[m],
)
if b.button("Balance", type="primary", key="insp_balance"):
    st.session_state["insp_balance_req"] = (str(src), method)
if st.session_state.get("insp_balance_req") == (str(src), method):
    try:
        with st.spinner("Balancing..."):
            result = data.balance(src, method)
    except InputError as e:
        st.error(str(e))
    except Exception as e:
        st.error(f"Could not balance `{src.name}`: {type(e).__name__}: {e}")
    else:
        s = result.summary
        st.success(
            f"Balanced {s.balanced} LoRA pair(s) of `{src.name}` with the {method} gauge"
            f"{f', {len(s.skipped)} left unchanged' if s.skipped else ''}, in {s.seconds:.2f} s."
        )
        c1, c2, c3 = st.columns(3)
        c1.metric("Layers balanced", s.balanced, help=f"{len(s.skipped)} left unchanged" if s.skipped else None)
        c2.metric(f"Worst relative imbalance (before: {s.max_rel_imbalance_before:.3g})", f"{s.max_rel_imbalance_after:.2e}")
        c3.metric("Largest relative change of dW", f"{s.max_rel_error:.2e}", help="‖ΔdW‖_F / ‖dW‖_F, measured by re-reading the written file")
        st.plotly_chart(plots.balance_check(s.changes), key="fig_insp_balance")
        st.dataframe(s.changes, hide_index=True, key="insp_changes")
        for note in s.notes:
            st.info(note)
        st.download_button(f"Download {result.file_name}", result.data, file_name=result.file_name, mime=result.mime, type="primary", key="insp_download")
