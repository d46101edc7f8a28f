"""Errors a user can cause and fix. The CLI prints them on one line and exits with code 2, no traceback."""


class UserError(Exception):
    """Bad input: a missing checkpoint, a wrong model type, a bad flag. The message names cause and fix."""


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the offending key."""


def out_of_memory_message(command: str, phase: str | None = None, gpu: bool = True) -> str:
    """The one line an out-of-memory failure of `command` (train with its phase, eval, generate, ...) ends in: the
    settings that lower that command's memory, largest effect first."""
    where = f"phase {phase}" if command == "train" and phase else f"rkl {command}"
    what = "GPU out of memory" if gpu else "out of memory"
    if command == "train" and phase in ("a", "b", "c"):
        knobs = ("lower --batch-size, --set chunk_width=N (W), --set max_inner_steps=N (K: backward keeps every inner "
                 "step) or --set seq_len=N (prefix + chunk), or --set gradient_checkpointing=true")
    elif command == "train":
        knobs = "lower --batch-size or --set seq_len=N, or --set gradient_checkpointing=true"
    elif command in ("eval", "generate"):
        knobs = "lower --chunk-width or --set max_inner_steps=N, or load the model in --dtype bfloat16"
    else:
        knobs = "use a machine with more memory"
    restart = ("; these settings change the run, so start it again with --overwrite (the last checkpoint in --out "
               "is intact)" if command == "train" else "")
    return f"{what} in {where}: {knobs}{restart}"
