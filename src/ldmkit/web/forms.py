"""The page's forms and the options its requests carry, both from the option declarations
(`ldmkit.options`): `fields` lists what the page draws for a verb on a run, `given` reads a
request's JSON fields by the declaration's names (its `check` runs in the api's calls).

A field is drawn unless its Spec says `web=False` (a request may still send it), for a run whose
conditioning it concerns (`when`: class, text, or condition = either; motion: a video run with
motion classes, whose direction names `run["directions"]` lists). Its name on the page is the
field's, or its Spec's `web_name` (guidance, for guidance_scale).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..options import Options


def fields(options: type[Options], run: Mapping[str, Any],
           values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The page's fields of a declaration for a run (`run`: its conditioning, class_names),
    each {name, label, value, and min / max / step / type, or options}; `values` ({field name:
    value}) replaces a field's default where the page shows another (the run's guidance)."""
    conditioning = run["conditioning"]
    out = []
    for f in sorted(options.fields(), key=lambda f: bool(f.spec.when)):  # conditions last
        spec = f.spec
        if spec.when == "motion":  # a video run with motion classes
            concerned = bool(run.get("directions"))
        else:
            concerned = not spec.when or spec.when in (conditioning, "condition")
        if not spec.web or not concerned:
            continue
        if spec.when == "condition" and conditioning == "none":
            continue
        value = (values or {}).get(f.name, f.default)
        item: dict[str, Any] = {"name": f.web_name, "label": spec.label or f.name.replace("_", " "),
                                "value": "" if value is None else value}  # fmt: skip
        if f.name == "classes" and spec.when == "class":
            item["options"] = ["", *(run.get("class_names") or [])]
            item["empty"] = spec.empty
        elif spec.when == "motion":  # the run's direction names
            item["options"] = ["", *run["directions"]]
            item["empty"] = spec.empty
        elif spec.choices:
            item["options"] = list(spec.choices)
        elif f.kind in ("int", "float"):
            lo, hi = f.spec.lo, f.spec.hi  # a limit read from the recipe or the run: the server's
            item.update(min=lo if not callable(lo) else None, max=hi if not callable(hi) else None,
                        step=spec.step or (1 if f.kind == "int" else None),
                        type=spec.widget or "number")  # fmt: skip
        else:
            item["type"] = spec.widget or "text"
        out.append(item)
    return out


def given(declared: type[Options], params: Mapping[str, Any]) -> dict[str, Any]:
    """A request's fields ({page or field name: value}) by field name; the page's empty inputs
    (an empty text or list, null) are left out, for the defaults. Unchecked: the api checks
    them (`Options.check`), before the job is queued and again in its call."""
    return declared.named(
        {k: v for k, v in params.items() if v is not None and v != "" and v != []}
    )


def names(declared: type[Options]) -> set[str]:
    """The names a request may use for the declaration's fields (the page's and the fields')."""
    return {f.web_name for f in declared.fields()} | {f.name for f in declared.fields()}
