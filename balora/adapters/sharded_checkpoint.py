"""Recognise an FSDP sharded checkpoint, which balora does not read, to say what to save instead.

FSDP's SHARDED_STATE_DICT (a Trainer option; accelerate's default is FULL_STATE_DICT) saves each
checkpoint-N as torch.distributed.checkpoint folders: .distcp shards and a .metadata file, which is
a pickle. balora reads adapters, and never unpickles a stranger's file, so such a path gets a
one-line error naming the model's shard folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def sharded_checkpoint_hint(path: Path, max_depth: int) -> str | None:
    """What to say when `path` is, or holds (max_depth folders deep), a torch.distributed.checkpoint:
    .distcp shards and their .metadata, what FSDP's SHARDED_STATE_DICT saves. None otherwise.
    Only names are read, and links to folders are not entered."""
    if path.suffix == ".distcp":
        found = "a torch.distributed.checkpoint shard"
    elif path.is_dir():
        folders = []
        for dirpath, dirnames, filenames in os.walk(path):
            depth = len(Path(dirpath).relative_to(path).parts)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < max_depth else []
            if ".metadata" in filenames and any(f.endswith(".distcp") for f in filenames):
                folders.append(Path(dirpath))
        if not folders:
            return None
        # the model's shards rather than the optimizer's (the Trainer writes pytorch_model_fsdp_0/, optimizer_0/)
        folder = min(folders, key=lambda f: ("model" not in f.name, str(f)))
        found = f"torch.distributed.checkpoint shards in {folder}"
    else:
        return None
    return (f"an FSDP sharded checkpoint ({found}), which balora does not read; save the adapter itself: "
            "trainer.save_model(DIR), or fsdp_config state_dict_type FULL_STATE_DICT (the Trainer's default), "
            "then inspect DIR")
