"""What a user can do with ldmkit, as plain Python functions: train, sample, edit, evaluate,
report, synthesise data, distil, fine-tune, convert, serve. The command line (`cli.py`) and the
web page only parse their input, call these and show the result; every check of a user's
arguments happens here, once per kind of argument (the options of each verb: their declarations
in `ldmkit.options`, checked once).

    from ldmkit import api
    result = api.train(data="builtin:shapes", out="runs/shapes", time_budget="10m")
    grid = api.sample("runs/shapes", n=50)
    api.save_grid(grid, "runs/shapes/grid.png")

Errors are `ValueError` subclasses (ConfigError, CheckpointError, ...) with one-line messages
that say what is wrong and what to do.

One module per command; this package re-exports their public names, so `api.sample` is the
function and its module is `ldmkit.api.sampling`:

- `checks`: one helper per kind of argument (counts, seeds, steps, devices, paths, outputs kept
  apart from the inputs) and a run's settings (`run_config`);
- `training`: `train`, `train_plan`, `check_data_root`, `tqdm_progress`, `training_log`;
- `sampling`: `sample`, `save_grid`, `save_images`;
- `edits`: `edit`, `save_edit`, `reproduce` and their checks;
- `evaluation`: `evaluate` (an `Evaluation`), `cas`, `report`, `table_text`;
- `synthetic`: `synth`; `students`: `distill`; `adapters`: `finetune`, `merge_adapter`;
- `conversion`: `convert_from_diffusers`, `export_to_diffusers`;
- `serving`: `serve` (the local web page).
"""

from .adapters import (
    MAX_NAME,
    check_new_name,
    finetune,
    merge_adapter,
)
from .checks import (
    MAX_NROW,
    NAME_MAX,
    PATH_MAX,
    check_apart,
    check_count,
    check_device,
    check_duration,
    check_guidance,
    check_output_file,
    check_path,
    check_seed,
    check_steps,
    check_writable,
    overlap,
    run_config,
    run_inputs,
    shorten,
)
from .conversion import (
    convert_from_diffusers,
    export_to_diffusers,
)
from .edits import (
    EDIT_METHODS,
    check_edit_options,
    check_edit_output,
    edit,
    edit_inputs,
    edit_outputs,
    recorded_inputs,
    reproduce,
    save_edit,
    torch_tensor,
)
from .evaluation import (
    CAS_PER_CLASS,
    MAX_CAS_SEEDS,
    Evaluation,
    cas,
    evaluate,
    read_synth_guidance,
    report,
    table_text,
)
from .sampling import (
    ANNOUNCE_FROM,
    Samples,
    sample,
    save_grid,
    save_images,
)
from .serving import (
    Server,
    open_server,
    serve,
)
from .students import (
    distill,
)
from .synthetic import (
    read_prompts_file,
    synth,
)
from .training import (
    TrainPlan,
    check_data_root,
    tqdm_progress,
    train,
    train_plan,
    training_log,
)
from .video import (  # issue 30: video runs
    Clips,
    check_animation_output,
    evaluate_video,
    is_video_run,
    sample_clips,
    save_clip_files,
    save_clips,
)

__all__ = [
    "ANNOUNCE_FROM",
    "CAS_PER_CLASS",
    "EDIT_METHODS",
    "Evaluation",
    "MAX_CAS_SEEDS",
    "MAX_NAME",
    "MAX_NROW",
    "NAME_MAX",
    "PATH_MAX",
    "Samples",
    "Server",
    "TrainPlan",
    "cas",
    "check_apart",
    "check_count",
    "check_data_root",
    "check_device",
    "check_duration",
    "check_edit_options",
    "check_edit_output",
    "check_guidance",
    "check_new_name",
    "check_output_file",
    "check_path",
    "check_seed",
    "check_steps",
    "check_writable",
    "convert_from_diffusers",
    "distill",
    "edit",
    "edit_inputs",
    "edit_outputs",
    "evaluate",
    "export_to_diffusers",
    "finetune",
    "merge_adapter",
    "open_server",
    "overlap",
    "read_prompts_file",
    "read_synth_guidance",
    "recorded_inputs",
    "report",
    "reproduce",
    "run_config",
    "run_inputs",
    "sample",
    "save_edit",
    "save_grid",
    "save_images",
    "serve",
    "shorten",
    "synth",
    "table_text",
    "torch_tensor",
    "tqdm_progress",
    "train",
    "train_plan",
    "training_log",
    # issue 30: video runs
    "Clips",
    "check_animation_output",
    "evaluate_video",
    "is_video_run",
    "sample_clips",
    "save_clip_files",
    "save_clips",
]
