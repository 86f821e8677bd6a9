"""The options of the sampling and editing verbs, each declared once.

One frozen dataclass per verb; every field carries its default, its range or choices and its
help text (`option`). The command line derives its flags and help from them (`cli.add_options`),
the web page its forms and the fields its requests may hold (`web/forms.py`), and `api.sample` /
`api.edit` check a call with the declaration's `check`, once; the library below them (pipeline,
editing) keeps only assertions about tensors. A new option is one field here; a new verb is one
declaration and one api function.

    @dataclass(frozen=True)
    class Img2ImgOptions(SampledEditOptions):
        verb: ClassVar[str] = "img2img"
        strength: float = option(0.6, "0..1: share of the steps that run (1 = a fresh sample)",
                                 lo=0, hi=1, lo_open=True, step=0.05, widget="range")

This module imports no torch (`ldmkit --help` reads these declarations): limits that heavier
modules own (recipe.py's MAX_SEED, a run's number of diffusion steps T) are read by small
functions when a check runs.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .config import ConfigError, check_float, check_int
from .diffusion.sampler_names import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLER_NAMES

if TYPE_CHECKING:
    from .runs import RunFolder

MAX_IMAGES = 100_000  # images one call of sample / eval draws (all are held in memory)
MAX_BATCH = 4096  # images per batch
MAX_FRAMES = 500  # frames of an interpolation
MAX_BLUR = 64  # pixels of feathered edge / cells of mask dilation
MAX_RESAMPLE = 100  # RePaint resamplings of a jump, fixed-point refinements of an inversion step

# A bound is a number, or a function of the run (None: no run at hand) read when a check runs.
Bound = int | float | Callable[["RunFolder | None"], float] | None


# ------------------------------------------------------------------------------ limits owned elsewhere
def max_seed(run: RunFolder | None = None) -> int:
    from .recipe import MAX_SEED

    return MAX_SEED


def max_guidance(run: RunFolder | None = None) -> float:
    from .recipe import MAX_GUIDANCE

    return MAX_GUIDANCE


def guidance_hint(run: RunFolder | None = None) -> str:
    from .recipe import GUIDANCE_HINT

    return GUIDANCE_HINT


def max_timesteps(run: RunFolder | None = None) -> int:
    from .recipe import MAX_TIMESTEPS

    return MAX_TIMESTEPS


def timesteps(run: RunFolder | None = None) -> int:
    """Sampler steps go up to the run's T (its diffusion steps; MAX_TIMESTEPS without a run)."""
    return max_timesteps() if run is None else run.config().diffusion.num_timesteps


# ------------------------------------------------------------------------------ declaring a field
@dataclass(frozen=True)
class Spec:
    """How the fronts show and check one option (a field's metadata["option"])."""

    help: str
    flag: str = ""  # the command line's spelling; "" is "--" + the field's name with dashes
    lo: Bound = None  # the range; a number field is checked against it
    hi: Bound = None
    lo_open: bool = False  # lo itself is refused: (lo, hi]
    hint: str | Callable[[RunFolder | None], str] = ""  # after a range message, e.g. " (1 = none)"
    choices: tuple[str, ...] = ()  # the values a text field may take
    check: Callable[[str, Any], Any] | None = None  # other values: (flag, value) -> checked value
    repeat: bool = False  # the flag may be given several times (its values form a list)
    web: bool = True  # on the page's form, and taken from its requests
    web_name: str = ""  # the page's name of the field, where it differs from the field's name
    label: str = ""  # the page's label; "" is the name with spaces
    step: float | None = None  # the page's number step (None: 1 for whole numbers, else any)
    widget: str = ""  # the page's input: "" (from the type), "range", "text", "lines"
    when: str = ""  # "class", "text", "condition": on the page for a run with that conditioning;
    # "motion": for a video run with motion classes (its choices: the run's direction names)
    empty: str = ""  # the page's label of the empty choice of `choices` (e.g. "one row per class")


def option(default: Any, help: str, **spec: Any) -> Any:
    """A declaration's field: its default and how the fronts show and check it (`Spec`)."""
    return field(default=default, metadata={"option": Spec(help=help, **spec)})


def like(base: type, name: str, default: Any, **changes: Any) -> Any:
    """A field of `base` declared again with another default (and `changes` to its Spec)."""
    f = base.__dataclass_fields__[name]
    spec = dataclasses.replace(f.metadata["option"], **changes)
    return field(default=default, metadata={"option": spec})


@dataclass(frozen=True)
class Field:
    """One option of a declaration as the fronts use it."""

    name: str
    default: Any
    spec: Spec
    kind: str  # "int", "float", "text", or "other" (a `spec.check` reads it)
    optional: bool  # None is a value (it means: the default of the run, or none)

    @property
    def flag(self) -> str:
        return self.spec.flag or "--" + self.name.replace("_", "-")

    @property
    def web_name(self) -> str:
        return self.spec.web_name or self.name

    def bound(self, which: str, run: RunFolder | None = None) -> Any:
        value = getattr(self.spec, which)
        return value(run) if callable(value) else value

    def check(self, value: Any, run: RunFolder | None = None) -> Any:
        """The value checked (a one-line ConfigError naming the flag), as the library takes it."""
        if value is None and self.optional:
            return None
        if self.spec.check is not None:
            return self.spec.check(self.flag, value)
        lo, hi = self.bound("lo", run), self.bound("hi", run)
        if self.kind == "int":
            return check_int(self.flag, value, lo, hi)
        if self.kind == "float":
            hint = self.spec.hint(run) if callable(self.spec.hint) else self.spec.hint
            return check_float(self.flag, value, lo, hi, lo_open=self.spec.lo_open, hint=hint)
        if not isinstance(value, str):
            raise ConfigError(f"{self.name} must be a string, got {value!r}")
        if self.spec.choices and value not in self.spec.choices:
            raise ConfigError(
                f"unknown {self.name} {value!r}; choose one of {', '.join(self.spec.choices)}"
            )
        return value


_UnionType = type(int | None)


def _kind(tp: Any) -> tuple[str, bool]:
    """(kind, optional) of a field's type: int, float (or int), str, or other."""
    args = set(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, _UnionType) else {tp}
    optional = type(None) in args
    args.discard(type(None))
    if args == {int}:
        return "int", optional
    if args and args <= {int, float}:
        return "float", optional
    if args == {str}:
        return "text", optional
    return "other", optional


# ------------------------------------------------------------------------------ declarations
@dataclass(frozen=True)
class Options:
    """The base of every declaration: its fields as the fronts use them, and their check."""

    verb: ClassVar[str] = ""

    @classmethod
    def fields(cls) -> tuple[Field, ...]:
        return _fields(cls)

    @classmethod
    def named(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """`values` ({field or page name: value}) by field name; a name the declaration does not
        have is refused in one line."""
        names = {f.web_name: f.name for f in cls.fields()} | {f.name: f.name for f in cls.fields()}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"{cls.verb} does not take {', '.join(unknown)}")
        return {names[k]: v for k, v in values.items()}

    @classmethod
    def given(cls, values: Mapping[str, Any]) -> Options:
        """The declaration with `values` ({field or page name: value}) over its defaults."""
        return cls(**cls.named(values))

    def or_instead(self, options: Options | None) -> Options:
        """A call's options: these (built from its keywords), or `options` given all at once
        instead; both at once (a keyword off its default beside `options`) is a TypeError."""
        if options is None:
            return self
        if self != type(self)():
            raise TypeError(f"give {self.verb}'s options as keywords or as `options`, not both")
        return options

    def check(self, run: RunFolder | None = None, shown: Any = None) -> Any:
        """Every field checked in declaration order, once; with the run, also what depends on it
        (its models saved, first; steps up to its T; the conditions it follows: `check_run`;
        `shown`: the run as the user named it, for messages). Returns the options as the library
        takes them (e.g. a colour given as text as numbers)."""
        if run is not None:
            self.require(run)
        values = {f.name: f.check(getattr(self, f.name), run) for f in self.fields()}
        if run is not None:
            self.check_run(run, shown if shown is not None else run.path, values)
        return dataclasses.replace(self, **values)

    def check_run(self, run: RunFolder, shown: Any, values: dict[str, Any]) -> None:
        """What a verb checks against the run beyond the fields' ranges (none by default)."""

    def require(self, run: RunFolder) -> None:
        """The run's saved models the verb needs: an image run's (a video run is refused in
        one line); `SampleOptions` also takes a video run."""
        run.require_trained()


@functools.cache
def _fields(cls: type) -> tuple[Field, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("option")
        if spec is not None:
            out.append(Field(f.name, f.default, spec, *_kind(hints[f.name])))
    return tuple(out)


def adjusted(cls: type, **changes: Mapping[str, Any]) -> type:
    """`cls` with some fields declared again: {name: {"default": ..., Spec field: ...}}, e.g. a
    front's own limit (the page draws at most 64 images a job)."""
    redeclared = []
    for name, change in changes.items():
        change = dict(change)
        default = change.pop("default", cls.__dataclass_fields__[name].default)
        redeclared.append(
            (name, cls.__dataclass_fields__[name].type, like(cls, name, default, **change))
        )
    return dataclasses.make_dataclass(cls.__name__, redeclared, bases=(cls,), frozen=True,
                                      namespace={"__module__": cls.__module__})  # fmt: skip


# ------------------------------------------------------------------------------ checks of other values
def check_texts(name: str, value: Any) -> list[str]:
    """Prompts: a list of strings (the command line's repeated --prompt, the page's lines)."""
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or not all(isinstance(p, str) for p in value)
    ):
        raise ConfigError(f"prompts must be a list of strings, one per grid row, got {value!r}")
    return list(value)


def check_prompt(name: str, value: Any) -> str | list[str]:
    """The prompt of an edit: one string, or a list of them (two for an interpolation)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(isinstance(p, str) for p in value):
        return list(value)
    raise ConfigError(f"prompt must be a string (or a list of them), got {value!r}")


def check_seeds(name: str, value: Any) -> list[int]:
    """Two seeds, as a list or as text ("1,2")."""
    if isinstance(value, str):
        value = [parse_number(s.strip()) for s in value.split(",") if s.strip()]
    seeds = list(value) if isinstance(value, Sequence) else [value]
    if len(seeds) != 2:
        raise ConfigError(f"{name} takes two seeds (the two ends), got {len(seeds)}")
    return [check_int(name, s, 0, max_seed()) for s in seeds]


def check_colour(name: str, value: Any) -> list[int]:
    """A colour: 1 or 3 whole numbers in 0..255, as a list or as text ("255,255,255")."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        colour = [int(v) if isinstance(v, str) and v.strip().isdecimal() else v for v in items]
    except TypeError:  # not a sequence
        colour = [value]
    ok = len(colour) in (1, 3) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in colour
    )
    if not ok:
        raise ConfigError(
            f"{name} takes 1 or 3 whole numbers in 0..255 (e.g. 255,255,255 for white), got "
            f"{value if isinstance(value, str) else list(colour)!r}"
        )
    return colour


def parse_number(text: str) -> int | float | str:
    """A number as typed (int if whole, else float); other text is passed on as it is, for the
    check to refuse with the option's name and range (the command line's reader of numbers)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def check_conditions(
    model: Any, run: Any, classes: str | None, prompts: Sequence[str] | None, negative: str | None
) -> None:
    """--class, --prompt and --negative-prompt against what the model was trained on; `model`
    is a loaded `LatentDiffusion` or a `RunFolder` (then nothing is loaded but run.json)."""
    from .runs import RunFolder

    if isinstance(model, RunFolder):
        text, has_classes = model.has_text(), bool(model.config().unet.num_classes)
    else:
        text, has_classes = model.is_text_conditional, model.conditioner.enabled
    if (prompts is not None or negative is not None) and not text:
        flag = "--prompt" if prompts is not None else "--negative-prompt"
        how = " (pick a class with --class)" if has_classes else ""
        raise ConfigError(
            f"{flag}: the model in {run} has no text conditioning, so it cannot follow a "
            f"prompt; drop {flag}{how}"
        )
    if classes is not None and not has_classes and not text:
        raise ConfigError(
            f"--class: the model in {run} was trained without class labels (unconditional); "
            "drop --class"
        )
    if classes is not None and text:
        raise ConfigError(
            f"--class: the model in {run} follows text prompts, not classes; describe what to "
            'draw with --prompt, e.g. --prompt "a large red star on a blue background"'
        )
    if text and not prompts:
        raise ConfigError(
            f"the model in {run} follows text prompts: give --prompt TEXT (repeat it for one "
            "row per prompt) or --prompts FILE (one per line)"
        )
    for p in prompts or []:
        if not p.strip():
            raise ConfigError(
                '--prompt is empty; describe the image, e.g. --prompt "a small blue circle"'
            )


# ------------------------------------------------------------------------------ adapters (issue 28)
MIN_ADAPTER_SCALE, MAX_ADAPTER_SCALE = 0.0, 4.0


def check_adapter_paths(name: str, value: Any) -> list[str]:
    """Adapter folders: a list of non-empty strings (the command line's repeated --adapter)."""
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or not all(isinstance(p, str) and p.strip() for p in value)
    ):
        raise ConfigError(
            f"{name} takes adapter folders (written by `ldmkit finetune`), got {value!r}"
        )
    return list(value)


def check_adapter_scales(name: str, value: Any) -> list[float]:
    """Adapter scales: numbers (or text of numbers, from the command line) in the range."""
    items = [value] if isinstance(value, (str, int, float)) else value
    if not isinstance(items, Sequence):
        raise ConfigError(f"{name} takes numbers, got {value!r}")
    out = []
    for v in items:
        v = parse_number(v.strip()) if isinstance(v, str) else v
        out.append(check_float(name, v, MIN_ADAPTER_SCALE, MAX_ADAPTER_SCALE, hint=" (0 = off)"))
    return out


def adapter_scales(adapters: Sequence[str] | None, scales: Sequence[float] | None) -> list[float]:
    """One scale per adapter: as given, the one given for all, or 1."""
    n = len(adapters or [])
    if not scales:
        return [1.0] * n
    return list(scales) * n if len(scales) == 1 else list(scales)


def check_adapters(
    run: RunFolder, shown: Any, adapters: Sequence[str] | None, scales: Sequence[float] | None
) -> list[str]:
    """--adapter and --adapter-scale against the run: each adapter made for its architecture
    and weights (`runs.AdapterFolder.check_fits`), one scale or one per adapter, no class taught
    twice. Returns the new classes' names, in the order the adapters add them."""
    from .runs import AdapterFolder

    if scales and not adapters:
        raise ConfigError("--adapter-scale: no --adapter given; add --adapter FOLDER or drop it")
    if not adapters:
        return []
    if scales and len(scales) not in (1, len(adapters)):
        raise ConfigError(
            f"--adapter-scale: {len(scales)} scales for {len(adapters)} adapters; give one for "
            "all, or one per --adapter"
        )
    new: list[str] = []
    words: list[str] = []
    for path in adapters:
        info = AdapterFolder(path).check_fits(run, shown)
        if info.word is not None:  # a text run's new word (issue 28): once per word
            if info.word.lower() in words:
                raise ConfigError(
                    f"--adapter {path} teaches the word {info.word!r}, which another --adapter "
                    "teaches already; give only one of them"
                )
            words.append(info.word.lower())
        if info.class_name is not None:
            if info.class_name in new or info.class_name in (run.data_info().class_names or []):
                raise ConfigError(
                    f"--adapter {path} teaches the class {info.class_name!r}, which the run or "
                    "another --adapter has already; give only one of them"
                )
            new.append(info.class_name)
    return new


def check_class_names(run: RunFolder, shown: Any, classes: str | None, new: Sequence[str]) -> None:
    """--class NAME against the run's class names and those its adapters add: an unknown name is
    one line that lists the known ones (and says that a fine-tuned class needs its --adapter)."""
    if classes is None or run.has_text():
        return
    names = run.data_info().class_names
    count = run.config().unet.num_classes or 0
    if not names or len(names) != count:
        names = [str(i) for i in range(count)]
    known = list(names) + list(new)
    for part in (p.strip() for p in classes.split(",")):
        if part not in known and not (part.isdigit() and int(part) < len(known)):
            raise ConfigError(
                f"unknown class {part!r}; known classes: {', '.join(known)} (a class taught "
                "by `ldmkit finetune` needs its --adapter)"
            )


# ------------------------------------------------------------------------------ sample
SAMPLER_HELP = f"sampler: {', '.join(SAMPLER_NAMES)}"
RUN_DEFAULT_SAMPLER = f" (default: the run's own: {DEFAULT_SAMPLER}, DDIM for a distilled student)"
RUN_DEFAULT_STEPS = f" (default: the run's own: {DEFAULT_STEPS}, a distilled student's count)"
INVERT_STEPS = 50  # `ldmkit invert`'s DDIM steps on a trained run
RUN_INVERT_STEPS = f" (default: the run's own: {INVERT_STEPS}, a distilled student's count)"
GUIDANCE_HELP = "classifier-free guidance scale (1 = none; default: the run's, with a condition)"


# the guidance options that sampling and every sampled edit share (one field each, declared here)
def negative_prompt_option() -> Any:
    return option(
        None, 'what guidance steers away from (instead of "")', when="text", widget="text"
    )


def guidance_scale_option() -> Any:
    return option(
        None, GUIDANCE_HELP, flag="--guidance", lo=0, hi=max_guidance, hint=guidance_hint,
        web_name="guidance", label="guidance", step=0.5, when="condition",
    )  # fmt: skip


def guidance_rescale_option() -> Any:
    return option(
        0.0, "0..1: pulls a high guidance scale's contrast back (Lin et al. 2024)", lo=0, hi=1,
        web=False,
    )  # fmt: skip


# ------------------------------------------------------------------------------ video runs (issue 30)
def max_given(run: RunFolder | None = None) -> int:
    """The most frames --given may give: one fewer than a video run's clip (the model's most
    without a run)."""
    if run is not None and run.is_video():
        video = run.config().video
        if video is not None:
            return video.frames - 1
    return 255


# issue 30: --direction (SampleOptions.directions), the motion class of a video run's clips
def direction_names() -> list[str]:
    """The directions a clip may move in (data.moving_shapes' eight, in its order: the motion
    class m of a run with video.motion_classes is the index here)."""
    from .data.moving_shapes import DIRECTION_NAMES

    return list(DIRECTION_NAMES)


def direction_indices(text: str) -> list[int]:
    """'left' or 'left,up-right' -> their motion classes; an unknown name is one line."""
    names = direction_names()
    out = []
    for part in (p.strip() for p in text.split(",")):
        if part not in names:
            raise ConfigError(
                f"--direction {part!r}: not a direction; use one of {', '.join(names)} "
                "(comma-separated for several)"
            )
        out.append(names.index(part))
    return out


def check_direction_names(name: str, value: Any) -> str:
    """--direction's value: direction names, comma-separated."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must name a direction (e.g. left), got {value!r}")
    direction_indices(value)
    return value


def check_video_motion(run: RunFolder, shown: Any, directions: str | None) -> None:
    """--direction needs a video run trained with motion classes (an image run's refusal is
    `check_video_options`')."""
    if directions is None or not run.is_video():
        return
    video = run.config().video
    if video is None or not video.motion_classes:
        raise ConfigError(
            f"--direction: {shown} was trained without motion classes (video.motion_classes=0), "
            "so it cannot be told a direction; drop --direction"
        )


def check_video_options(run: RunFolder, shown: Any, values: dict[str, Any]) -> None:
    """The video flags of `sample` against the run: refused by an image run; --given needs
    --first-frames; adapters are image runs' only."""
    video = run.is_video()
    flags = [("--first-frames", values.get("first_frames")), ("--given", values.get("given_frames")),
             ("--fps", values.get("fps")), ("--direction", values.get("directions"))]  # fmt: skip
    if not video:
        for flag, value in flags:
            if value is not None:
                raise ConfigError(
                    f"{flag}: {shown} is an image run; {flag} applies to video runs only, drop it"
                )
        return
    if values.get("given_frames") is not None and values.get("first_frames") is None:
        raise ConfigError("--given counts frames of --first-frames; give --first-frames CLIP.gif")
    if values.get("adapters"):
        raise ConfigError(f"--adapter: {shown} is a video run; adapters apply to image runs only")
    check_video_motion(run, shown, values.get("directions"))


@dataclass(frozen=True)
class SampleOptions(Options):
    """`ldmkit sample`, `api.sample`, the page's Sample tab."""

    verb: ClassVar[str] = "sample"
    n: int = option(64, "images to draw", lo=1, hi=MAX_IMAGES, label="images")
    # None: the run's own (`RunFolder.default_sampling`: DEFAULT_SAMPLER at DEFAULT_STEPS, or a
    # distilled student's DDIM at its step count), filled in by `check` with the run
    sampler: str | None = option(None, SAMPLER_HELP + RUN_DEFAULT_SAMPLER, choices=SAMPLER_NAMES)
    steps: int | None = option(None, "sampler steps" + RUN_DEFAULT_STEPS, lo=1, hi=timesteps)
    seed: int = option(0, "seed of the images' noise", lo=0, hi=max_seed)
    classes: str | None = option(
        None, "class name(s) or index(es), comma-separated", flag="--class", when="class",
        label="class", empty="one row per class",
    )  # fmt: skip
    prompts: tuple[str, ...] | None = option(
        None, "text prompt of a text-conditional model; repeat it for one row per prompt",
        flag="--prompt", check=check_texts, repeat=True, when="text", widget="lines",
        label="prompts, one per row",
    )  # fmt: skip
    negative_prompt: str | None = negative_prompt_option()
    guidance_scale: float | None = guidance_scale_option()
    guidance_rescale: float = guidance_rescale_option()
    batch_size: int = option(64, "images per batch", lo=1, hi=MAX_BATCH, web=False)
    # issue 28: adapters written by `ldmkit finetune` (the page's adapter list is a later step)
    adapters: tuple[str, ...] | None = option(
        None, "adapter folder written by `ldmkit finetune`; repeat it for several",
        flag="--adapter", check=check_adapter_paths, repeat=True, web=False,
    )  # fmt: skip
    adapter_scales: tuple[float, ...] | None = option(
        None, f"strength of each --adapter ({MIN_ADAPTER_SCALE:g}..{MAX_ADAPTER_SCALE:g}; 0 = "
        "off, 1 = as trained); one for all, or one per --adapter (default 1)",
        flag="--adapter-scale", check=check_adapter_scales, repeat=True, web=False,
    )  # fmt: skip

    # issue 30: a video run's clips (flags that an image run refuses)
    first_frames: str | None = option(
        None, "video runs: an animation (GIF/WebP/APNG) whose first frames the clips continue",
        flag="--first-frames", web=False,
    )  # fmt: skip
    given_frames: int | None = option(
        None, "video runs: how many frames of --first-frames are given (default: all it has, "
        "up to one fewer than the clip's)", lo=1, hi=lambda run: max_given(run), flag="--given",
        web=False,
    )  # fmt: skip
    fps: float | None = option(
        None, "video runs: frames per second of the animations written (default: the run's)",
        lo=0, lo_open=True, hi=100, web=False,
    )  # fmt: skip
    # issue 30: the direction of a video run trained with motion classes (video.motion_classes)
    directions: str | None = option(
        None, "video runs with motion classes: direction(s) of the clips' motion, comma-separated "
        "(left, up-right, ...; cycled over the clips; default: every direction in turn)",
        flag="--direction", check=check_direction_names, when="motion", web_name="direction",
        label="direction", empty="every direction in turn",
    )  # fmt: skip

    def require(self, run: RunFolder) -> None:
        if run.is_video():
            run.require_trained_video()
        else:
            run.require_trained()

    def check_run(self, run: RunFolder, shown: Any, values: dict[str, Any]) -> None:
        check_video_options(run, shown, values)
        check_conditions(run, shown, values["classes"], values["prompts"],
                         values["negative_prompt"])  # fmt: skip
        fill_run_sampling(run, values)
        check_student_guidance(run, shown, values["guidance_scale"])
        new = check_adapters(run, shown, values["adapters"], values["adapter_scales"])
        check_class_names(run, shown, values["classes"], new)


# ------------------------------------------------------------------------------ run defaults
# (issue 27) the sampler and steps a verb leaves to the run, and a distilled student's guidance
def fill_run_sampling(run: RunFolder, values: dict[str, Any], steps: int = DEFAULT_STEPS) -> None:
    """`values`' sampler and steps left None, filled with the run's own
    (`RunFolder.default_sampling`): a distilled student's DDIM at its count; else DEFAULT_SAMPLER
    and `steps` (the verb's count for a trained run)."""
    own_sampler, own_steps = run.default_sampling()
    if run.distill_record() is None:
        own_steps = steps
    if values.get("sampler", "") is None:
        values["sampler"] = own_sampler
    if values.get("steps", 0) is None:
        values["steps"] = own_steps


def check_student_guidance(run: RunFolder, shown: Any, scale: float | None) -> None:
    """A student distilled at one guidance scale (no guidance input) has that scale built in:
    its only scale is 1 (its default). Another would guide the distilled guidance again with an
    unconditional branch it was never trained for; refused in one line."""
    if scale is None or scale == 1.0:
        return
    record = run.distill_record()
    if record is None or record.get("guidance_input"):
        return
    if not (run.has_text() or run.config().unet.num_classes):
        return  # unconditional: no guidance to speak of
    w = float(record.get("guidance_scale", 1.0))
    raise ConfigError(
        f"--guidance {scale:g}: {shown} is a student distilled at guidance {w:g}, which is built "
        "into its weights (it samples with none: 1); drop --guidance, or distil the teacher "
        "with --guidance-mode input for a student that takes the scale"
    )


# ------------------------------------------------------------------------------ edits
@dataclass(frozen=True)
class EditOptions(Options):
    """What every edit takes: steps and a condition (an inversion takes no sampler and no seed:
    it runs DDIM's deterministic path)."""

    # None: the run's own (`RunFolder.default_sampling`), filled in by `check_run` (issue 27)
    steps: int | None = option(None, "sampler steps" + RUN_DEFAULT_STEPS, lo=1, hi=timesteps)
    classes: str | None = option(
        None, "class name or index of a class-conditional model", flag="--class", when="class",
        label="class", empty="(none)",
    )  # fmt: skip
    prompt: str | tuple[str, ...] | None = option(
        None, "text prompt of a text-conditional model", check=check_prompt, repeat=True,
        when="text", widget="text",
    )  # fmt: skip
    negative_prompt: str | None = negative_prompt_option()
    guidance_scale: float | None = guidance_scale_option()
    guidance_rescale: float = guidance_rescale_option()

    # the step count a trained run takes when none is given (a student: its own count)
    run_steps: ClassVar[int] = DEFAULT_STEPS

    def check_run(self, run: RunFolder, shown: Any, values: dict[str, Any]) -> None:
        fill_run_sampling(run, values, self.run_steps)
        check_student_guidance(run, shown, values["guidance_scale"])


@dataclass(frozen=True)
class SampledEditOptions(EditOptions):
    """An edit that runs a sampler from noise of its own."""

    sampler: str | None = option(None, SAMPLER_HELP + RUN_DEFAULT_SAMPLER, choices=SAMPLER_NAMES)
    seed: int = option(0, "seed of the edit's noise", lo=0, hi=max_seed)


@dataclass(frozen=True)
class InpaintOptions(SampledEditOptions):
    """`ldmkit inpaint`: regenerate the white part of a mask."""

    verb: ClassVar[str] = "inpaint"
    mask_blur: int = option(0, "pixels of soft edge outside the mask when pasting back", lo=0,
                            hi=MAX_BLUR, label="mask blur (px)")  # fmt: skip
    mask_dilate: int = option(0, "grow the latent mask by N cells", lo=0, hi=MAX_BLUR,
                              label="mask dilate (cells)")  # fmt: skip
    repaint_resample: int = option(1, "RePaint: resample each jump N times (1 = off; samplers "
                                   "ddpm, ddim)", lo=1, hi=MAX_RESAMPLE,
                                   label="RePaint resamples (1 = off; ddpm, ddim)")  # fmt: skip
    repaint_jump: int = option(10, "RePaint: jump length in steps", lo=1, hi=max_timesteps,
                               label="RePaint jump (steps)")  # fmt: skip


@dataclass(frozen=True)
class FillOptions(InpaintOptions):
    """`ldmkit fill`: inpaint the mask, or the pixels of one colour."""

    verb: ClassVar[str] = "fill"
    hole_colour: str | tuple[int, ...] = option(
        (255, 255, 255), "R,G,B (0..255) of the holes, without a mask", check=check_colour,
        web=False,
    )  # fmt: skip


@dataclass(frozen=True)
class Img2ImgOptions(SampledEditOptions):
    """`ldmkit img2img`: noise an image part of the way, denoise it (SDEdit)."""

    verb: ClassVar[str] = "img2img"
    strength: float = option(0.6, "0..1: share of the steps that run (1 = a fresh sample)",
                             lo=0, hi=1, lo_open=True, step=0.05, widget="range")  # fmt: skip


@dataclass(frozen=True)
class InvertOptions(EditOptions):
    """`ldmkit invert`: DDIM inversion, an image's noise and the round trip."""

    verb: ClassVar[str] = "invert"
    steps: int | None = like(EditOptions, "steps", None, help="DDIM steps" + RUN_INVERT_STEPS)
    run_steps: ClassVar[int] = INVERT_STEPS
    refine: int = option(0, "fixed-point iterations per step (exact inverse steps)", lo=0,
                         hi=MAX_RESAMPLE)  # fmt: skip


@dataclass(frozen=True)
class InterpolateOptions(SampledEditOptions):
    """`ldmkit interpolate`: frames between two seeds, images or conditions."""

    verb: ClassVar[str] = "interpolate"
    sampler: str | None = like(SampledEditOptions, "sampler", "ddim", help=SAMPLER_HELP)
    seed: int = like(SampledEditOptions, "seed", 0, web=False)  # the page: seed A, seed B
    seeds: str | tuple[int, int] | None = option(
        None, "two seeds, e.g. 1,2", check=check_seeds, web=False
    )
    frames: int = option(8, "number of frames, both ends included", lo=2, hi=MAX_FRAMES)


@dataclass(frozen=True)
class DenoiseOptions(SampledEditOptions):
    """`ldmkit denoise`: remove Gaussian noise."""

    verb: ClassVar[str] = "denoise"
    noise_std: float | None = option(None, "the noise's std on the 0..1 pixel scale (default: "
                                     "estimated)", lo=0, hi=1, step=0.01,
                                     label="noise std (0..1; empty: estimate)")  # fmt: skip


# ------------------------------------------------------------------------------ synth
SYNTH_KEEP = ("all", "readable")  # which drawn images `synth` keeps
MAX_SYNTH_IMAGES = 1_000_000  # images of one synth folder (written batch by batch, not held)


@dataclass(frozen=True)
class SynthOptions(Options):
    """`ldmkit synth`, `api.synth`: a labelled folder of generated images (ldmkit.synth)."""

    verb: ClassVar[str] = "synth"
    per_class: int | None = option(
        None, "images per class of a class-conditional run", lo=1, hi=MAX_SYNTH_IMAGES, web=False
    )
    classes: str | None = option(
        None, "only these classes of a class-conditional run: name(s) or index(es), "
        "comma-separated (default: every class)", flag="--class", web=False,
    )  # fmt: skip
    n: int | None = option(
        None, "images of an unconditional run, or per prompt of a text run", lo=1,
        hi=MAX_SYNTH_IMAGES, web=False,
    )  # fmt: skip
    prompts_file: str | None = option(
        None, "a text run's prompts, one per line (one sub-folder each)", flag="--prompts",
        web=False,
    )  # fmt: skip
    sampler: str = option(DEFAULT_SAMPLER, SAMPLER_HELP, choices=SAMPLER_NAMES)
    steps: int = option(DEFAULT_STEPS, "sampler steps", lo=1, hi=timesteps)
    seed: int = option(0, "seed of the first image (image i of a folder: a seed of its own, "
                       "from this one)", lo=0, hi=max_seed)  # fmt: skip
    guidance_scale: float | None = guidance_scale_option()
    guidance_rescale: float = guidance_rescale_option()
    batch_size: int = option(64, "images per batch", lo=1, hi=MAX_BATCH, web=False)
    keep: str = option(
        "all", "all, or readable: only images the run's domain classifier reads as their class "
        "(more are drawn until each class has its count; the dropped are counted)",
        choices=SYNTH_KEEP, web=False,
    )  # fmt: skip

    def check_run(self, run: RunFolder, shown: Any, values: dict[str, Any]) -> None:
        text, classes = run.has_text(), bool(run.config().unet.num_classes)
        kind = "text" if text else "class" if classes else "none"
        what = {"text": "follows text prompts", "class": "is class-conditional",
                "none": "was trained without class labels (unconditional)"}[kind]  # fmt: skip
        want = {"text": "give --prompts FILE (one prompt per line) and --n N (images per prompt)",
                "class": "give --per-class N", "none": "give --n N"}[kind]  # fmt: skip
        if values["per_class"] is not None and kind != "class":
            raise ConfigError(f"--per-class: the model in {shown} {what}; {want}")
        if values["prompts_file"] is not None and kind != "text":
            raise ConfigError(
                f"--prompts: the model in {shown} has no text conditioning; drop --prompts and "
                f"{want}"
            )
        if values["n"] is not None and kind == "class":
            raise ConfigError(f"--n: the model in {shown} {what}; {want} (images per class)")
        if (values["per_class"] if kind == "class" else values["n"]) is None or (
            kind == "text" and values["prompts_file"] is None
        ):
            raise ConfigError(f"the model in {shown} {what}: {want}")
        if values["classes"] is not None:
            if kind != "class":
                raise ConfigError(f"--class: the model in {shown} {what}; drop --class")
            check_synth_classes(run, values["classes"])
        if values["keep"] == "readable" and kind != "class":
            raise ConfigError(
                f"--keep readable: the model in {shown} {what}, and only a class-conditional "
                "run's classes can be read back; drop --keep"
            )


def class_subset(spec: str, class_names: Sequence[str] | None, num_classes: int) -> list[int]:
    """The class indexes that `--class` names ("3", "circle", "circle,2"), in the run's order;
    a ConfigError names an unknown one and lists the known."""
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    parts = [p.strip() for p in spec.split(",")]
    if not any(parts):
        raise ConfigError(f"--class is empty; name one or more of: {', '.join(names)}")
    picked = set()
    for part in parts:
        if part in names:
            picked.add(names.index(part))
        elif part.isdigit() and int(part) < len(names):
            picked.add(int(part))
        else:
            raise ConfigError(
                f"--class: unknown class {part!r}; known classes: {', '.join(names)} (names or "
                f"indexes 0-{len(names) - 1}, comma-separated; drop --class for every class)"
            )
    return sorted(picked)


def check_synth_classes(run: RunFolder, classes: str) -> list[int]:
    """synth's --class against the run's classes (names or indexes, comma-separated): the class
    indexes it names."""
    names = run.data_info().class_names
    count = run.config().unet.num_classes or 0
    return class_subset(classes, names if names and len(names) == count else None, count)


_EDIT_DECLARATIONS = (InpaintOptions, FillOptions, Img2ImgOptions, InvertOptions,
                      InterpolateOptions, DenoiseOptions)  # fmt: skip
EDITS: dict[str, type[EditOptions]] = {o.verb: o for o in _EDIT_DECLARATIONS}


# ------------------------------------------------------------------------------ distill
def check_duration_text(name: str, value: Any) -> str:
    """A duration such as "20m" or "1h30m" (recipe.parse_duration reads it)."""
    from .recipe import parse_duration

    if not isinstance(value, str):
        raise ConfigError(f"{name} takes a duration such as 20m or 1h, got {value!r}")
    parse_duration(value, name)
    return value


DISTILL_WEIGHTINGS = ("truncated-snr", "snr+1")
DISTILL_ITERATIONS = 400  # optimizer steps per halving without a time budget
DISTILL_MAX_ITERATIONS = 10_000_000  # ... with one: the budget's plan ends each halving  # diffusion.distillation.WEIGHTINGS (a test)


@dataclass(frozen=True)
class DistillOptions(Options):
    """`ldmkit distill`, `api.distill`: progressive distillation of a run into a few-step
    student (training/distill.py). Not on the web page."""

    verb: ClassVar[str] = "distill"
    steps: int = option(4, "the student's DDIM steps: a power of two below --teacher-steps",
                        lo=1, hi=timesteps, web=False)  # fmt: skip
    teacher_steps: int = option(64, "the teacher's DDIM steps the first halving starts from (a "
                                "power of two)", lo=2, hi=timesteps, web=False)  # fmt: skip
    iterations: int | None = option(None, f"optimizer steps per halving (default "
                                    f"{DISTILL_ITERATIONS}; with --time-budget: as many as it "
                                    "allows)", lo=1, hi=DISTILL_MAX_ITERATIONS, web=False)  # fmt: skip
    time_budget: str | None = option(None, "the whole distillation's wall-clock time, e.g. 20m, "
                                     "split evenly over the halvings", check=check_duration_text,
                                     web=False)  # fmt: skip
    batch_size: int = option(32, "latents per optimizer step", lo=1, hi=MAX_BATCH, web=False)
    lr: float = option(1e-4, "peak learning rate (AdamW, cosine decay per halving)", lo=0, hi=1,
                       lo_open=True, web=False)  # fmt: skip
    weighting: str = option("truncated-snr", "loss weight on the x error: truncated-snr = "
                            "max(SNR, 1) (Salimans & Ho 2022), snr+1 = the plain v MSE",
                            choices=DISTILL_WEIGHTINGS, web=False)  # fmt: skip
    seed: int = option(0, "seed of the data order and noise", lo=0, hi=max_seed, web=False)
    guidance_mode: str = option(
        "fixed", "fixed: the student learns the run's guidance scale (one UNet call a step, "
        "unguided); input: it takes the scale as an input (Meng et al. 2023), one student for "
        "every scale up to --max-guidance", choices=("fixed", "input"), web=False,
    )  # fmt: skip
    max_guidance: float | None = option(
        None, "with --guidance-mode input: the largest scale it learns (default: twice the "
        "run's)", lo=1, hi=max_guidance, web=False,
    )  # fmt: skip
    sampler: str = option(
        "auto", "the student's default sampler: ddim (the path it learned), lcm (fresh noise "
        "between its steps), or auto: measured at the end, ddim unless lcm is clearly better",
        choices=("auto", "ddim", "lcm"), web=False,
    )  # fmt: skip


# Every verb's declaration by the verb's name: the fronts look them up here (so a test can
# extend one and see it reach every front).
VERBS: dict[str, type[Options]] = {"sample": SampleOptions, **EDITS}
VERBS["distill"] = DistillOptions


# ------------------------------------------------------------------------------ train
# The options of `ldmkit train` a person sets per call (the page's New run form shows them):
# everything else of a run is its config (--config FILE, --set KEY=VALUE), and the CLI's own
# flags (--out, --resume, --stage, --device, ...) stay in cli.py.
CONDITIONINGS = ("auto", "none", "class", "text")  # recipe.RunConfig.conditioning's values


def min_image_size(run: RunFolder | None = None) -> int:
    from .recipe import MIN_IMAGE_SIZE

    return MIN_IMAGE_SIZE


def max_image_size(run: RunFolder | None = None) -> int:
    from .recipe import MAX_IMAGE_SIZE

    return MAX_IMAGE_SIZE


def check_duration_text(name: str, value: Any) -> str:
    """A wall-clock duration as typed ('90s', '10m', '1h30m', or seconds), checked by the
    recipe's reader (its one-line message names `name`); kept as the text a config holds."""
    from .recipe import parse_duration

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a number of seconds (a page's number input, a Python caller)
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a duration such as 10m or 1h30m, got {value!r}")
    parse_duration(value, name)
    return value


def check_data_spec(name: str, value: Any) -> str:
    """A data spec: text (a folder, builtin:shapes, mnist:PATH, ...) or a path object."""
    import os

    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a folder or a data spec such as builtin:shapes, "
                          f"got {value!r}")  # fmt: skip
    return value


@dataclass(frozen=True)
class TrainOptions(Options):
    """`ldmkit train`'s per-call options, `api.train`, the page's New run form."""

    verb: ClassVar[str] = "train"
    data: str | None = option(
        None, "folder of images, builtin:shapes (default), builtin:mnist, builtin:digits, "
        "mnist:PATH, fashion-mnist:PATH, cifar10:PATH, cifar100:PATH", check=check_data_spec,
        widget="text",
        label="data (a folder under --data-root, or builtin:shapes)",
    )  # fmt: skip
    time_budget: str | None = option(
        None, "wall-clock budget for both stages, e.g. 10m", check=check_duration_text,
        widget="text", label="time budget (e.g. 10m; empty: the configured steps)",
    )  # fmt: skip
    seed: int | None = option(None, "seed of the run (default 0)", lo=0, hi=max_seed,
                              label="seed (empty: 0)")  # fmt: skip
    image_size: int | None = option(
        None, "side of the square training images in px (default: the data's own, or the "
        "largest this device trains in the time given; the log says which)", lo=min_image_size,
        hi=max_image_size, step=8, label="image size (px; empty: chosen for the data)",
    )  # fmt: skip
    conditioning: str | None = option(
        None, "what the UNet is conditioned on: auto (default: class labels if the data has "
        "them, else captions, else none), none, class, text (= --set conditioning=...)",
        choices=CONDITIONINGS,
    )  # fmt: skip


VERBS["train"] = TrainOptions
VERBS["synth"] = SynthOptions


# ------------------------------------------------------------------------------ finetune (issue 28)
MAX_LORA_RANK = 1024  # models.lora.MAX_RANK (a test keeps them equal; this module imports no torch)


def check_duration_option(name: str, value: Any) -> float:
    """A wall-clock duration ('90s', '10m', '1h30m') in seconds, > 0."""
    from .recipe import parse_duration

    return parse_duration(value, name)


FINETUNE_TARGETS = ("attention", "attention+conv")


@dataclass(frozen=True)
class FinetuneOptions(Options):
    """`ldmkit finetune`, `api.finetune`: how an adapter learns from a few images (the run,
    the images, the new name and the output folder are the verb's own inputs)."""

    verb: ClassVar[str] = "finetune"
    # rank 8 on attention + convs: with --gate class, 10 crosses read right 0.69 at 150 steps
    # against 0.47 (rank 4 LoCon) and 0.25 (rank 4 attention only); docs/performance.md
    rank: int = option(8, "rank of the LoRA adapters", lo=1, hi=MAX_LORA_RANK)
    alpha: float | None = option(
        None, "LoRA alpha: the adapters' path is scaled by alpha / rank (default: the rank)",
        lo=0, lo_open=True, hi=1e6,
    )  # fmt: skip
    targets: str = option(
        "attention+conv", "layers adapted: attention (q, k, v, out projections) or attention+conv "
        "(also the residual blocks' convolutions: LoCon)", choices=FINETUNE_TARGETS,
    )  # fmt: skip
    steps: int = option(600, "optimizer steps (a --time-budget may end it sooner)", lo=1,
                        hi=1_000_000)  # fmt: skip
    time_budget: str | None = option(None, "wall-clock budget, e.g. 5m",
                                     check=check_duration_option)  # fmt: skip
    lr: float = option(1e-3, "learning rate of the adapter (AdamW)", lo=0, hi=1, lo_open=True)
    class_lr: float | None = option(
        None, "learning rate of the new class's embedding row (default: 3 % of the old rows' RMS, "
        "so that it can travel between classes in a few hundred steps)", lo=0, hi=100,
        lo_open=True,
    )  # fmt: skip
    batch_size: int = option(8, "images per step (and as many prior samples)", lo=1, hi=MAX_BATCH)
    prior_weight: float = option(
        1.0, "weight of prior preservation: the base run's own samples trained on beside the new "
        "images, so that its classes stay as they were (0 = off)", lo=0, hi=100,
    )  # fmt: skip
    prior_images: int = option(64, "base samples drawn once (and cached) for prior preservation",
                               lo=1, hi=10_000)  # fmt: skip
    augment: str = option("none", "flip: learn the images' mirror images too (not for digits or "
                          "text)", choices=("none", "flip"))  # fmt: skip
    seed: int = option(0, "seed of the fine-tuning's noise and of the prior samples", lo=0,
                       hi=max_seed)  # fmt: skip
    gate: str = option(
        "class", "class: a new class's adapter acts on that class only (the old classes and the "
        "null label stay the base run's, bit for bit; cannot be merged), a text run's on prompts "
        "holding the new word only; none: on every class or prompt",
        choices=("class", "none"),
    )  # fmt: skip


VERBS["finetune"] = FinetuneOptions
