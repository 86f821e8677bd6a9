"""The run folder: the one owner of the files a training writes and everything else reads.

    RUN/
      run.json             the resolved RunConfig (ldmkit.recipe)        config(), write_config()
      data.json            data spec, name, fingerprint, channels, classes  data_info(), write_data_info()
      training.json        how each stage went: steps planned and run, why   stage_report(), ...
                           it ended, the autoencoder's measured quality,
                           and the problems a user must hear of             warnings()
      vae/  unet/          config.json + model.safetensors each             load_vae(), save_unet(), ...
      text_encoder/        the same, for a text-conditional run (for the    load_text_encoder(), ...
                           frozen MiniLM: config.json, a reference + SHA-256)
      tokenizer.json       its tokenizer (kind, max length, vocabulary)     load_tokenizer(), ...
      latents.safetensors  cached posterior moments of the training data   cached_moments(), ...
      checkpoints/         resumable training states (ldmkit.training.state owns their format)
      samples/             preview grids; samples.png, loss.png, reconstructions.png beside them
      log.jsonl, tb/       scalars (JSON lines; TensorBoard when installed)
      trackers/            the experiment trackers of log.trackers (training/trackers.py):
                           ids.json (the tracked runs' ids, so --resume continues them),
                           wandb/ (W&B's offline runs, written by wandb), mlruns/ (MLflow's
                           file store)                                   tracker_ids(), ...
      stop                 a stop request to the training running here  request_stop(), ...
      eval/                evaluation caches and tables (ldmkit.evaluation owns their format)
      distill.json         a distilled student's record: method, the teacher and the    distill_record(), ...
                           SHA-256 of its weights, step counts, guidance, each halving
      video_unet/          a video run's UNet (models/video.py; run.json's `video` says     load_video_unet(), ...
                           frames and fps); a video run has no unet/, and clips.gif and
                           frames.png (its final clips and their frames) beside samples.png

Like diffusers' pipeline folder (model_index.json + one sub-folder per component), nothing but
`RunFolder` names these paths: training, the pipeline, evaluation, interop, the CLI and the
tests' helpers all go through it. A training writes run.json before its first step (so
--resume finds the config); a conversion writes it after the models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .checkpoint import (
    WEIGHTS_NAME,
    CheckpointError,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from .config import ConfigError, from_dict, to_dict
from .diffusion.sampler_names import DEFAULT_SAMPLER, DEFAULT_STEPS
from .models.lora import LoraConfig
from .recipe import RunConfig
from .utils import hash_file

if TYPE_CHECKING:
    from .data.dataset import ImageDataset
    from .data.video import VideoData
    from .models.text import MiniLMEncoder, TextEncoder, Tokenizer
    from .models.unet import UNet
    from .models.vae import Autoencoder
    from .models.video import VideoUNet

log = logging.getLogger(__name__)


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows (JSON objects) of a log.jsonl. A last line that does not parse is one being
    written and is left out quietly; any other line that is not a JSON object, with a warning."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif i < len(lines) - 1:
            log.warning("%s line %d is not a JSON object; skipped", path, i + 1)
    return rows


@dataclasses.dataclass
class DataInfo:
    """data.json: what a run was trained on (all optional: converted runs know little)."""

    spec: str | None = None  # the --data spec
    name: str | None = None  # the data set's display name
    num_images: int | None = None
    channels: int | None = None
    image_size: int | None = None
    class_names: list[str] | None = None  # index = class label
    fingerprint: str | None = None  # ImageDataset.fingerprint() of the images trained on
    labels_from: str | None = None  # where the class labels came from, e.g. "sub-folder names"
    native_size: int | None = None  # the short side the data's images came in (most common)
    size_note: str | None = None  # how image_size was chosen (training/sizing.py)
    # a video run's data (issue 30): clips, each of `frames` frames (num_images counts frames)
    num_clips: int | None = None
    frames: int | None = None


def read_data(
    spec: str, *, image_size: int, channels: int | None = None, seed: int = 0,
    conditioning: str = "auto",
) -> ImageDataset:  # fmt: skip
    """`data.load_dataset` as a run reads its data: labels from a folder's class sub-folders as
    `conditioning` asks ("auto": when every image sits in one of two or more; "class": always,
    an error without that layout; "none": never), and sub-folders holding an ldmkit run left
    out (a run's sample grids are no training data). Training and evaluation both read so."""
    from .data import load_dataset

    return load_dataset(
        spec, image_size=image_size, channels=channels, seed=seed,
        labels_from_folders={"auto": "auto", "class": True}.get(conditioning, False),
        skip_folder=RunFolder.holds_run,
    )  # fmt: skip


def read_video(
    spec: str, *, image_size: int, frames: int, seed: int = 0, conditioning: str = "auto",
) -> VideoData:  # fmt: skip
    """`data.video.load_video_data` as a video run reads its clips (a folder of animations
    with its sub-folders skipped when they hold an ldmkit run, as `read_data` does)."""
    from .data.video import load_video_data

    return load_video_data(
        spec, frames=frames, image_size=image_size, seed=seed,
        labels_from_folders={"auto": "auto", "class": True}.get(conditioning, False),
        skip_folder=RunFolder.holds_run,
    )  # fmt: skip


class RunFolder:
    """Paths and files of one run folder. Creating the object touches no file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ layout
    @property
    def config_path(self) -> Path:
        return self.path / "run.json"

    @property
    def data_path(self) -> Path:
        return self.path / "data.json"

    @property
    def vae_dir(self) -> Path:
        return self.path / "vae"

    @property
    def unet_dir(self) -> Path:
        return self.path / "unet"

    @property
    def text_encoder_dir(self) -> Path:
        return self.path / "text_encoder"

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def log_path(self) -> Path:
        return self.path / "log.jsonl"

    def read_log(self) -> list[dict[str, Any]]:
        """The rows of the run's log.jsonl (none before the first; see `read_log`)."""
        return read_log(self.log_path) if self.log_path.is_file() else []

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tb"

    @property
    def latents_path(self) -> Path:
        return self.path / "latents.safetensors"

    @property
    def final_grid_path(self) -> Path:
        return self.path / "samples.png"

    @property
    def loss_plot_path(self) -> Path:
        return self.path / "loss.png"

    @property
    def reconstructions_path(self) -> Path:
        return self.path / "reconstructions.png"

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    @property
    def training_report_path(self) -> Path:
        return self.path / "training.json"

    @property
    def stop_path(self) -> Path:
        return self.path / "stop"

    @property
    def trackers_dir(self) -> Path:
        """The experiment trackers' folder (W&B is given it and writes its wandb/ inside)."""
        return self.path / "trackers"

    @property
    def wandb_dir(self) -> Path:
        """W&B's offline runs (offline-run-DATE-ID/), for `wandb sync`."""
        return self.trackers_dir / "wandb"

    @property
    def mlflow_store(self) -> Path:
        """MLflow's file store, when no tracking URI is given."""
        return self.trackers_dir / "mlruns"

    @property
    def tracker_ids_path(self) -> Path:
        return self.trackers_dir / "ids.json"

    # a video run's files (issue 30)
    @property
    def video_unet_dir(self) -> Path:
        return self.path / "video_unet"

    @property
    def final_clips_path(self) -> Path:
        """The final clips of a video run's training, as one animated GIF (a grid per frame)."""
        return self.path / "clips.gif"

    @property
    def final_frames_path(self) -> Path:
        """The same clips' frames: one row per clip."""
        return self.path / "frames.png"

    def preview_path(self, step: int, prefix: str = "") -> Path:
        return self.samples_dir / f"{prefix}step-{step:08d}.png"

    def newest_preview(self) -> Path | None:
        """The preview grid written last (autoencoder or diffusion stage), or None."""
        grids = list(self.samples_dir.glob("*step-*.png")) if self.samples_dir.is_dir() else []
        return max(grids, key=lambda p: (p.stat().st_mtime_ns, p.name), default=None)

    # ------------------------------------------------------------------ stop requests
    # A file, so that another process (a web page's server, a script) can ask a training to
    # stop with a checkpoint, as SIGINT does; the training clears it when it starts and ends.
    def request_stop(self) -> None:
        self.stop_path.touch()

    def stop_requested(self) -> bool:
        return self.stop_path.exists()

    def clear_stop_request(self) -> None:
        self.stop_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ trackers
    def tracker_ids(self) -> dict[str, Any]:
        """{tracker: what continues its run} as saved ({} when absent or unreadable)."""
        try:
            data = read_json(self.tracker_ids_path)
        except (CheckpointError, OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_tracker_ids(self, ids: dict[str, Any]) -> None:
        write_json(self.tracker_ids_path, ids)

    # ------------------------------------------------------------------ state
    def exists(self) -> bool:
        """Whether a run was started (or converted) here: run.json exists."""
        return self.config_path.is_file()

    @staticmethod
    def holds_run(path: str | os.PathLike) -> bool:
        """Whether the folder `path` holds an ldmkit run (the folder reader skips those)."""
        return RunFolder(path).exists()

    def has_model(self, part: str) -> bool:
        folder = self.path / part
        return (folder / WEIGHTS_NAME).is_file() and (folder / "config.json").is_file()

    def require_run(self) -> RunFolder:
        """Raise a one-line error unless this is a run folder; return self."""
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"run folder {self.path} does not exist; train one with `ldmkit train --out {self.path}`"
            )
        if not self.exists():
            raise FileNotFoundError(
                f"{self.path} is not a run folder (no run.json); "
                f"train one with `ldmkit train --out {self.path}`"
            )
        return self

    def require_new(self) -> RunFolder:
        """Raise a one-line error if the folder holds a run already (a new training may not
        start in it); return self."""
        if self.exists():
            raise ConfigError(
                f"{self.path} already holds a run; pass --resume to continue it, or choose "
                "another --out folder"
            )
        return self

    def is_trained(self) -> bool:
        """Whether both models are saved: the autoencoder and the UNet (a video run's video
        UNet)."""
        return self.has_model("vae") and self.has_model("video_unet" if self.is_video() else "unet")

    def require_trained(self) -> RunFolder:
        """Raise a one-line error unless both models are saved; return self. A video run is
        refused here: what needs an image UNet (the edits, distill, finetune, ...) cannot use
        one; `require_trained_video` is its door."""
        if not self.path.is_dir():
            raise CheckpointError(
                f"run folder {self.path} does not exist; train one with `ldmkit train --out {self.path}`"
            )
        if self.is_video():
            raise ConfigError(
                f"{self.path} is a video run; this command works on image runs only (a video "
                "run samples with `ldmkit sample` and is measured with `ldmkit eval`)"
            )
        for part in ("vae", "unet"):
            if not (self.path / part / WEIGHTS_NAME).is_file():
                raise CheckpointError(
                    f"{self.path} has no trained {part} ({self.path / part / WEIGHTS_NAME} is "
                    "missing); finish or resume the training with `ldmkit train --resume`"
                )
        return self

    def is_video(self) -> bool:
        """Whether this is a video run (run.json's `video` is set, or it saved a video UNet)."""
        if self.video_unet_dir.is_dir():
            return True
        try:
            return isinstance(self.config_dict().get("video"), dict)
        except (CheckpointError, OSError, ValueError, AttributeError):
            return False

    def require_trained_video(self) -> RunFolder:
        """Raise a one-line error unless this is a video run with both models saved."""
        self.require_run()
        if not self.is_video():
            raise ConfigError(
                f"{self.path} is an image run; this needs a video run (train one with "
                "`ldmkit train --data builtin:moving-shapes --out RUN`)"
            )
        for part in ("vae", "video_unet"):
            if not self.has_model(part):
                raise CheckpointError(
                    f"{self.path} has no trained {part} ({self.path / part} is missing or "
                    "incomplete); finish or resume the training with `ldmkit train --resume`"
                )
        return self

    # ------------------------------------------------------------------ training.json
    # {"autoencoder": {...}, "diffusion": {...}}: each stage's steps, planned steps, seconds,
    # why it ended, measurements (the autoencoder's), and "problems": one-line findings that
    # every command using the run repeats (`warnings`)
    def stage_report(self) -> dict[str, Any]:
        """training.json as saved ({} when absent or unreadable: runs trained before it)."""
        try:
            data = read_json(self.training_report_path)
        except (CheckpointError, OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_stage_report(self, stage: str, record: dict[str, Any]) -> None:
        """Set one stage's record (the others are kept)."""
        report = self.stage_report()
        report[stage] = record
        write_json(self.training_report_path, report)

    def warnings(self) -> list[str]:
        """The problems its training found (a failed or cut-short stage), one line each."""
        out = []
        for stage, record in self.stage_report().items():
            if isinstance(record, dict):
                out += [f"{stage}: {p}" for p in record.get("problems") or [] if isinstance(p, str)]
        return out

    # ------------------------------------------------------------------ run.json, data.json
    def config_dict(self) -> dict[str, Any]:
        """run.json as saved (a dict), for checks that compare settings key by key."""
        return read_json(self.config_path)

    def config(self) -> RunConfig:
        try:
            return from_dict(RunConfig, self.config_dict())
        except ConfigError as e:
            raise CheckpointError(f"{self.config_path}: {e}") from None

    def write_config(self, cfg: RunConfig) -> None:
        write_json(self.config_path, to_dict(cfg))

    def data_info(self) -> DataInfo:
        if not self.data_path.is_file():
            return DataInfo()
        raw = read_json(self.data_path)
        known = {f.name for f in dataclasses.fields(DataInfo)}
        return DataInfo(**{k: v for k, v in raw.items() if k in known})

    def write_data_info(self, info: DataInfo) -> None:
        write_json(self.data_path, dataclasses.asdict(info))

    def load_data(self, spec: str | None = None) -> ImageDataset:
        """The run's training data (or `spec` at the run's image size, channels and seed)."""
        cfg, info = self.config(), self.data_info()
        spec = spec or info.spec or cfg.data
        size, seed, how = cfg.image_size, cfg.seed, cfg.conditioning
        if spec != info.spec or info.fingerprint is None:
            return read_data(
                spec, image_size=size, channels=cfg.channels, seed=seed, conditioning=how
            )
        # the trainer loads with channels unset unless the user set them (run.json holds the
        # resolved value), and the fingerprint covers that choice: try both
        for channels in dict.fromkeys([None, cfg.channels]):
            ds = read_data(spec, image_size=size, channels=channels, seed=seed, conditioning=how)
            if ds.fingerprint() == info.fingerprint:
                return ds
        log.warning(
            "%s now gives other images than the run was trained on (fingerprint %s, was %s)",
            spec, ds.fingerprint(), info.fingerprint,
        )  # fmt: skip
        return ds

    # ------------------------------------------------------------------ models
    def load_vae(self, device: str | torch.device | None = None) -> Autoencoder:
        from .models.vae import Autoencoder

        return Autoencoder.from_pretrained(self.vae_dir, device=device)

    def load_unet(self, device: str | torch.device | None = None) -> UNet:
        from .models.unet import UNet

        return UNet.from_pretrained(self.unet_dir, device=device)

    def has_text(self) -> bool:
        """Whether the run is text-conditional (it saved a tokenizer or a text encoder)."""
        return self.tokenizer_path.is_file() or self.text_encoder_dir.is_dir()

    def conditioning(self) -> str:
        """ "text", "class" or "none": what the run's model is conditioned on (read from its
        files and run.json; nothing is loaded)."""
        if self.has_text():
            return "text"
        return "class" if self.config().unet.num_classes else "none"

    def load_text_encoder(
        self, device: str | torch.device | None = None
    ) -> TextEncoder | MiniLMEncoder:
        """The trained encoder, or the frozen pretrained one the run names (loaded from its
        package: config.json holds a reference and the weights' SHA-256, not weights)."""
        from .models.text import MiniLMEncoder, TextEncoder, is_pretrained_reference

        if is_pretrained_reference(self.text_encoder_dir):
            return MiniLMEncoder.from_pretrained(self.text_encoder_dir, device=device)
        if not self.has_model("text_encoder"):
            raise CheckpointError(
                f"{self.path} is a text-conditional run without a trained text encoder "
                f"({self.text_encoder_dir / WEIGHTS_NAME} is missing); finish or resume the "
                "training with `ldmkit train --resume`"
            )
        return TextEncoder.from_pretrained(self.text_encoder_dir, device=device)

    def save_text_encoder(self, encoder: TextEncoder | MiniLMEncoder) -> None:
        encoder.save_pretrained(self.text_encoder_dir)

    def load_tokenizer(self) -> Tokenizer:
        from .models.text import Tokenizer, TokenizerConfig

        try:
            return Tokenizer(from_dict(TokenizerConfig, read_json(self.tokenizer_path)))
        except ConfigError as e:
            raise CheckpointError(
                f"{self.tokenizer_path} is not a valid tokenizer ({e}); the file is corrupt"
            ) from None

    def save_tokenizer(self, tokenizer: Tokenizer) -> None:
        write_json(self.tokenizer_path, dataclasses.asdict(tokenizer.config))

    def save_vae(self, vae: Autoencoder) -> None:
        vae.save_pretrained(self.vae_dir)

    def save_unet(self, unet: UNet) -> None:
        unet.save_pretrained(self.unet_dir)

    def load_video_unet(self, device: str | torch.device | None = None) -> VideoUNet:
        from .models.video import VideoUNet

        return VideoUNet.from_pretrained(self.video_unet_dir, device=device or "cpu")

    def save_video_unet(self, model: VideoUNet) -> None:
        model.save_pretrained(self.video_unet_dir)

    def weights_hash(self) -> str:
        """SHA-256 (first 16 hex digits) of the weights a sample depends on: the autoencoder's,
        the UNet's and, for a text model, the text encoder's and the tokenizer's files. Edited
        PNGs record it, so that reproducing one from its metadata can tell a retrained run."""
        digest = hashlib.sha256()
        unet_dir = self.video_unet_dir if self.video_unet_dir.is_dir() else self.unet_dir
        files = [self.vae_dir / WEIGHTS_NAME, unet_dir / WEIGHTS_NAME]
        if self.has_text():
            files += [self.text_encoder_dir / WEIGHTS_NAME, self.tokenizer_path]
        for path in files:
            hash_file(digest, path)
        return digest.hexdigest()[:16]

    # ------------------------------------------------------------------ latent cache
    def vae_identity(self, num_images: int) -> str:
        """Identifies the saved VAE weights and data size a latent cache was made from."""
        return f"{(self.vae_dir / WEIGHTS_NAME).stat().st_mtime_ns}:{num_images}"

    def cached_moments(self, vae_id: str) -> Tensor | None:
        """The cached posterior moments when they were made by `vae_id`, else None."""
        meta_path = self.path / "latents.json"
        if not self.latents_path.is_file():
            return None
        try:
            cached = load_tensors(self.latents_path)
            meta = read_json(meta_path) if meta_path.is_file() else {}
        except CheckpointError:
            log.warning("latent cache %s is unreadable; encoding the data again", self.latents_path)
            return None
        return cached["moments"] if meta.get("vae_id") == vae_id else None

    def save_moments(self, moments: Tensor, vae_id: str) -> None:
        save_tensors(self.latents_path, {"moments": moments})
        write_json(self.path / "latents.json", {"vae_id": vae_id, "shape": list(moments.shape)})

    # ------------------------------------------------------------------ distilled students
    # A student (`ldmkit distill`, training/distill.py) is a run folder like any other: the
    # teacher's config, data record and autoencoder (and text encoder), its own UNet, and
    # distill.json, whose sampler and steps are the run's own defaults (`default_sampling`).
    @property
    def distill_path(self) -> Path:
        return self.path / "distill.json"

    def distill_record(self) -> dict[str, Any] | None:
        """distill.json of a distilled student, or None (a run trained by `ldmkit train`)."""
        if not self.distill_path.is_file():
            return None
        data = read_json(self.distill_path)
        if not isinstance(data, dict):
            raise CheckpointError(
                f"{self.distill_path} is not a distillation record; it is corrupt"
            )
        return data

    def write_distill_record(self, record: dict[str, Any]) -> None:
        write_json(self.distill_path, record)

    def default_sampling(self) -> tuple[str, int]:
        """The sampler and step count this run samples with unless told otherwise: a student's
        (deterministic DDIM at its distilled step count), else DEFAULT_SAMPLER at DEFAULT_STEPS."""
        record = self.distill_record() if self.distill_path.is_file() else None
        if (
            record
            and isinstance(record.get("sampler"), str)
            and isinstance(record.get("steps"), int)
        ):
            return record["sampler"], record["steps"]
        return DEFAULT_SAMPLER, DEFAULT_STEPS

    def start_student(self, teacher: RunFolder, cfg: RunConfig) -> None:
        """Copy what a student shares with its teacher: data.json, training.json (its warnings
        hold for the student's autoencoder too), the autoencoder, the text encoder and tokenizer,
        and the evaluation caches that depend on the data only (the domain classifier, reference
        features); then write the student's run.json (`cfg`)."""
        import shutil

        self.path.mkdir(parents=True, exist_ok=True)
        for name in ("data.json", "training.json", "tokenizer.json"):
            if (teacher.path / name).is_file():
                shutil.copy2(teacher.path / name, self.path / name)
        for name in ("vae", "text_encoder", "eval/domain-classifier", "eval/reference"):
            if (teacher.path / name).is_dir():
                shutil.copytree(teacher.path / name, self.path / name, dirs_exist_ok=True)
        self.write_config(cfg)


# ------------------------------------------------------------------------------ adapters (issue 28)
ADAPTER_FORMAT = "ldmkit-adapter"


@dataclasses.dataclass
class AdapterInfo:
    """adapter.json: what an adapter is, which run it fits, and how it was made.

    `base_weights_hash` is the base run's `RunFolder.weights_hash()` and `unet` its UNet's
    config (as run.json holds it): an adapter loads only onto the weights it was trained on."""

    lora: LoraConfig
    base_weights_hash: str
    unet: dict[str, Any]
    kind: str = "class"  # "class": a new class (a class embedding row + LoRA); "style": LoRA only
    class_name: str | None = None
    class_index: int | None = None  # its label when it is the only adapter loaded
    base_run: str | None = None  # the run folder as given (for messages only)
    steps: int = 0
    lr: float | None = None  # the adapter's learning rate
    class_lr: float | None = None  # the new class row's
    data: str | None = None
    data_fingerprint: str | None = None
    num_images: int = 0
    flip: bool = False
    prior_weight: float = 0.0
    prior_images: int = 0
    seconds: float = 0.0
    gate: str = "none"  # "class": the adapter acts on its new class only (lora.gate_by_class)
    # a text run's adapter (kind "word"): the new word, learned as a new token row of the text
    # encoder (text.add_word); gate "word": the LoRA acts on prompts holding it only
    word: str | None = None
    format: str = ADAPTER_FORMAT
    version: int = 1


class AdapterFolder(RunFolder):
    """An adapter folder written by `ldmkit finetune`:

        A/
          adapter.json          AdapterInfo: LoraConfig, the base run's weights hash, the class
          adapter.safetensors   the LoRA weights ("<layer>.lora_down/up.weight") and, for a new
                                class, its class embedding row ("class_rows")
          prior.safetensors     the base run's own samples (latents, labels), cached
          checkpoints/, log.jsonl   the fine-tuning's checkpoints and log (as a run's)

    The checkpoints and log keep a run folder's names (`RunFolder`), so the training loop
    writes them as it does for a run."""

    CLASS_ROWS = "class_rows"
    WORD_ROW = "word_row"  # a text adapter's new token row (1, width)

    @property
    def info_path(self) -> Path:
        return self.path / "adapter.json"

    @property
    def weights_path(self) -> Path:
        return self.path / "adapter.safetensors"

    @property
    def prior_path(self) -> Path:
        return self.path / "prior.safetensors"

    def holds_adapter(self) -> bool:
        return self.info_path.is_file()

    def info(self) -> AdapterInfo:
        """adapter.json, checked; a missing or foreign file is a one-line error."""
        if not self.path.is_dir():
            raise CheckpointError(
                f"adapter folder {self.path} does not exist; make one with `ldmkit finetune`"
            )
        if not self.holds_adapter():
            raise CheckpointError(
                f"{self.path} is not an adapter folder (no adapter.json); make one with "
                "`ldmkit finetune --out ...`"
            )
        raw = read_json(self.info_path)
        if not isinstance(raw, dict) or raw.get("format") != ADAPTER_FORMAT:
            raise CheckpointError(f"{self.info_path} is not an ldmkit adapter's adapter.json")
        try:
            return from_dict(AdapterInfo, raw)
        except ConfigError as e:
            raise CheckpointError(f"{self.info_path}: {e}") from None

    def save(self, info: AdapterInfo, tensors: dict[str, Tensor]) -> None:
        """The weights first, adapter.json last (it marks a complete adapter)."""
        save_tensors(self.weights_path, tensors, metadata={"format": ADAPTER_FORMAT})
        write_json(self.info_path, to_dict(info))

    def tensors(self) -> dict[str, Tensor]:
        return load_tensors(self.weights_path)

    def check_fits(self, run: RunFolder, shown: Any = None) -> AdapterInfo:
        """adapter.json, refused (one line) unless the adapter was trained on `run`'s UNet
        architecture and weights."""
        info = self.info()
        here = to_dict(run.config().unet)
        if info.unet != here:
            odd = sorted(k for k in set(here) | set(info.unet) if here.get(k) != info.unet.get(k))
            raise ConfigError(
                f"--adapter {self.path} was made for another architecture than the UNet of "
                f"{shown or run.path} ({', '.join(odd[:3])} differ); use it with the run it was "
                f"trained on ({info.base_run})"
            )
        if info.base_weights_hash != run.weights_hash():
            raise ConfigError(
                f"--adapter {self.path} was trained on other weights than those of "
                f"{shown or run.path} (weights hash {info.base_weights_hash}, the run's "
                f"{run.weights_hash()}); use it with the run it was trained on ({info.base_run}), "
                "or fine-tune again on this run"
            )
        return info

    def load_into(
        self, unet: UNet, name: str, scale: float = 1.0, text: tuple[Any, Any] | None = None
    ) -> AdapterInfo:
        """Add this adapter to `unet` (in place) as `name`, at `scale`; its new class, if any,
        becomes the next class label. A text adapter's new word goes into `text` (the run's
        text encoder and tokenizer, in place). The caller checked the run with `check_fits`."""
        from .models.lora import (
            add_class_rows,
            gate_by_class,
            gate_by_words,
            inject_lora,
            load_lora_state_dict,
            set_lora_scale,
            watch_prompts,
        )

        info = self.info()
        tensors = self.tensors()
        rows = tensors.pop(self.CLASS_ROWS, None)
        word_row = tensors.pop(self.WORD_ROW, None)
        if info.kind == "word":
            from .models.text import add_word

            if word_row is None or info.word is None:
                raise CheckpointError(f"{self.weights_path} lacks its word's row; it is corrupt")
            if text is None:
                raise ConfigError(
                    f"{self.path} teaches a text run the word {info.word!r}; it needs the run's "
                    "text encoder (ldmkit sample --run R --adapter A)"
                )
            token = add_word(text[0], text[1], info.word, word_row)
            watch_prompts(unet)
        inject_lora(unet, info.lora, name)
        load_lora_state_dict(unet, tensors, name)
        set_lora_scale(unet, name, scale)
        if info.kind == "class":
            if rows is None:
                raise CheckpointError(f"{self.weights_path} lacks its class row; it is corrupt")
            label = add_class_rows(unet, name, rows)
            if info.gate == "class":
                gate_by_class(unet, name, range(label, label + len(rows)))
        if info.kind == "word" and info.gate == "word":
            gate_by_words(unet, name, [token])
        return info
