"""The only code that walks a PEFT model (`live`, and `pair_cache`, which keeps a walk while the
model does not change) or reads and writes adapter files.

Reading: `reading` (the reader registry, PEFT / Trainer / kohya / bare) and `wild` (diffusers,
LyCORIS), over `tensor_file`, `entries` (key names -> pairs) and `peft_config`; `hub` fetches
Hub ids into the local cache. Writing: `writing`.
"""

# PEFT's PeftModel names every module of the wrapped model "base_model.model.<name>"; balora
# names modules without it, live or on disk, so both spell a module the same way.
PEFT_PREFIX = "base_model.model."
