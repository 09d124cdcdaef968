"""The only code that walks a PEFT model (`live`) or reads adapter files (`files`)."""
