"""The only code that walks a PEFT model (`live`) or reads and writes adapter files (`reading`, `writing`)."""

# PEFT's PeftModel names every module of the wrapped model "base_model.model.<name>"; balora
# names modules without it, live or on disk, so both spell a module the same way.
PEFT_PREFIX = "base_model.model."
