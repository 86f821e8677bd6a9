"""`ldmkit finetune` end to end on tiny runs: the adapter folder, sampling with it (new class,
scales, several adapters), prior preservation's cache, resume, and every refusal."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from adapter_helpers import few_images, fixed_noise_loss, make_adaptable_run
from reliability_helpers import error_line, run_cli

from ldmkit import api
from ldmkit.models.lora import add_class_rows
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runs import AdapterFolder, RunFolder
from ldmkit.training import finetune as ft

QUICK = ["--steps", "40", "--prior-images", "6", "--batch-size", "4", "--lr", "3e-3", "--quiet"]


@pytest.fixture(scope="module")
def adapter(runs, tmp_path_factory):
    """A class adapter 'blob' of the class run, made by the command line."""
    from ldmkit import cli

    out = tmp_path_factory.mktemp("adapter") / "blob"
    rc = cli.main(["finetune", "--run", str(runs["class"]), "--data", str(runs["few"]),
                   "--name", "blob", "--out", str(out), *QUICK])  # fmt: skip
    assert rc == 0
    return out


def few_loss(unet, run, label: int) -> float:
    """The run's diffusion loss on the few images' latents, label `label`, fixed t and noise."""
    ldm = LatentDiffusion.from_run(run, fast=False)
    images = RunFolder(run).load_data(str(few_dir(run))).images
    from ldmkit.data.transforms import to_float

    z0 = ldm.encode(to_float(images)).repeat(8, 1, 1, 1)
    return fixed_noise_loss(unet, run, z0, {"class_labels": torch.full((len(z0),), label)})


def few_dir(run):
    return RunFolder(run).path.parent / "few"


def test_the_adapter_folder_holds_a_small_file_and_what_it_fits(runs, adapter):
    a = AdapterFolder(adapter)
    info = a.info()
    assert (info.kind, info.class_name, info.class_index) == ("class", "blob", 3)
    assert info.base_weights_hash == RunFolder(runs["class"]).weights_hash()
    assert info.steps == 40 and info.num_images == 5
    # class-gated by default: it never acts on the old classes, so no prior samples are drawn
    assert info.gate == "class" and info.prior_images == 0 and info.prior_weight == 0
    targets = ("to_q", "to_k", "to_v", "to_out", "conv1", "conv2")
    assert info.lora.rank == 8 and info.lora.targets == targets  # the defaults
    tensors = a.tensors()
    assert tensors["class_rows"].shape == (1, 128)
    # 4 attention blocks (down, 2 up, mid) x 4 projections, and two convs in each resnet, x (A, B)
    # and the class row
    resnets = sum(1 for k in tensors if k.endswith("conv1.lora_down.weight"))
    assert resnets >= 4 and len(tensors) == (4 * 4 + 2 * resnets) * 2 + 1
    assert a.weights_path.stat().st_size < 400_000  # the base UNet is ~0.1 M parameters
    assert not a.prior_path.exists()
    assert json.loads(a.info_path.read_text())["format"] == "ldmkit-adapter"


def test_fine_tuning_lowers_the_new_class_loss_on_its_images(runs, adapter):
    run = runs["class"]
    start = RunFolder(run).load_unet()
    add_class_rows(start, "x", 1)  # where the fine-tuning began: the mean row, LoRA at zero
    tuned = LatentDiffusion.from_run(run, adapters=[(adapter, 1.0)], fast=False).unet
    before, after = few_loss(start, run, 3), few_loss(tuned, run, 3)
    assert after < 0.9 * before, (before, after)


def test_sampling_with_the_adapter(runs, adapter):
    run = runs["class"]
    base = api.sample(run, n=3, steps=4, classes="c0,c1,c2")
    # the old classes at scale 0: the base model, bit for bit
    off = api.sample(run, n=3, steps=4, classes="c0,c1,c2", adapters=[str(adapter)],
                     adapter_scales=[0.0])  # fmt: skip
    assert torch.equal(off.images, base.images)
    new = api.sample(run, n=3, steps=4, classes="blob", adapters=[str(adapter)])
    old = api.sample(run, n=3, steps=4, classes="c0", adapters=[str(adapter)])
    assert (new.images - old.images).abs().mean() > 1e-3
    assert "adapters blob x1" in new.description
    # by index too; and a grid draws one row per class, the new one last
    by_index = api.sample(run, n=3, steps=4, classes="3", adapters=[str(adapter)])
    assert torch.equal(by_index.images, new.images)
    grid = api.sample(run, n=8, steps=2, adapters=[str(adapter)], adapter_scales=[0.8])
    assert grid.row_labels == ["c0", "c1", "c2", "blob"]


def test_two_adapters_at_once(runs, adapter, tmp_path):
    second = tmp_path / "second"
    res = api.finetune(runs["class"], data=str(runs["few"]), name="blob2", out=second, steps=3,
                       prior_weight=0)  # fmt: skip
    assert res.info.prior_images == 0 and not AdapterFolder(second).prior_path.exists()
    grid = api.sample(runs["class"], n=10, steps=2, adapters=[str(adapter), str(second)],
                      adapter_scales=[1.0, 0.5])  # fmt: skip
    assert grid.row_labels == ["c0", "c1", "c2", "blob", "blob2"]
    with pytest.raises(ValueError, match="teaches the class 'blob'"):
        api.sample(runs["class"], n=2, steps=2, adapters=[str(adapter), str(adapter)])


def test_a_style_adapter_of_an_unconditional_run(runs, tmp_path):
    out = tmp_path / "style"
    res = api.finetune(runs["uncond"], data=str(runs["few"]), name="look", out=out, steps=5,
                       prior_images=4, targets="attention+conv", augment="flip")  # fmt: skip
    info = res.info
    assert (info.kind, info.class_name, info.class_index, info.flip) == ("style", None, None, True)
    assert "class_rows" not in AdapterFolder(out).tensors()
    assert "conv1" in info.lora.targets
    base = api.sample(runs["uncond"], n=2, steps=3)
    off = api.sample(runs["uncond"], n=2, steps=3, adapters=[str(out)], adapter_scales=[0])
    assert torch.equal(off.images, base.images)


def test_the_prior_samples_are_drawn_once_and_cached(runs, tmp_path, monkeypatch):
    run = RunFolder(runs["class"])
    ldm = LatentDiffusion.from_run(run.path, fast=False)
    a = AdapterFolder(tmp_path / "a")
    latents, labels = ft.prior_samples(run, a, ldm, 5, seed=1)
    assert latents.shape == (5, 4, 8, 8) and labels.tolist() == [0, 1, 2, 0, 1]

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(ldm, "sample", no_sampling)
    again, again_labels = ft.prior_samples(run, a, ldm, 5, seed=1)
    assert torch.equal(again, latents) and torch.equal(again_labels, labels)
    with pytest.raises(AssertionError, match="sampled again"):  # another count: drawn anew
        ft.prior_samples(run, a, ldm, 6, seed=1)


def test_resume_continues_from_the_checkpoint(runs, tmp_path):
    out = tmp_path / "r"
    api.finetune(runs["class"], data=str(runs["few"]), name="r", out=out, steps=4,
                 prior_images=4)  # fmt: skip
    with pytest.raises(ValueError, match="holds an adapter already"):
        api.finetune(runs["class"], data=str(runs["few"]), name="r", out=out, steps=4)
    res = api.finetune(runs["class"], data=str(runs["few"]), name="r", out=out, steps=6,
                       prior_images=4, resume=True)  # fmt: skip
    assert res.info.steps == 6


# ------------------------------------------------------------------------------ refusals
def refused(capsys, *argv) -> str:
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2, err
    return error_line(err)


def test_refusals_of_finetune(runs, capsys, tmp_path):
    run, few = str(runs["class"]), runs["few"]
    two = tmp_path / "two"
    two.mkdir()
    for p in sorted(few.iterdir())[:2]:
        shutil.copy(p, two / p.name)
    base = ["finetune", "--run", run, "--out", str(tmp_path / "A"), "--steps", "2"]
    line = refused(capsys, *base, "--data", str(two), "--name", "x")
    assert "holds 2 images; fine-tuning needs at least 3" in line
    line = refused(capsys, *base, "--data", str(few), "--name", "c1")
    assert "'c1' is a class of" in line and "choose a new name" in line
    for bad in ("a,b", "12", " x"):
        line = refused(capsys, *base, "--data", str(few), "--name", bad)
        assert "cannot be picked with --class" in line
    line = refused(capsys, *base, "--data", str(few), "--name", "x", "--targets", "all")
    assert "unknown targets 'all'" in line
    line = refused(capsys, *base, "--data", str(few), "--name", "x", "--rank", "0")
    assert "--rank must be a whole number from 1 to 1024" in line
    line = refused(capsys, "finetune", "--run", run, "--data", str(few), "--name", "x",
                   "--out", run)  # fmt: skip
    assert "over the run's own" in line
    assert not (tmp_path / "A").exists()


def test_refusals_of_sample_with_adapters(runs, adapter, capsys, tmp_path):
    run = str(runs["class"])
    sample = ["sample", "--run", run, "--n", "2", "--steps", "2", "--out", str(tmp_path / "g.png")]
    line = refused(capsys, *sample, "--class", "blob")
    assert line == (
        "ldmkit: error: unknown class 'blob'; known classes: c0, c1, c2 (a class "
        "taught by `ldmkit finetune` needs its --adapter)"
    )
    line = refused(capsys, *sample, "--adapter-scale", "0.5")
    assert "no --adapter given" in line
    line = refused(capsys, *sample, "--adapter", str(adapter), "--adapter-scale", "1",
                   "--adapter-scale", "2")  # fmt: skip
    assert "2 scales for 1 adapters" in line
    line = refused(capsys, *sample, "--adapter", str(adapter), "--adapter-scale", "9")
    assert "--adapter-scale must be a finite number in [0, 4]" in line
    line = refused(capsys, *sample, "--adapter", str(tmp_path))
    assert "is not an adapter folder (no adapter.json)" in line
    # the same architecture, other weights
    other = make_adaptable_run(tmp_path / "other", seed=1)
    line = refused(capsys, "sample", "--run", str(other), "--adapter", str(adapter), "--n", "2",
                   "--out", str(tmp_path / "g.png"))  # fmt: skip
    assert "was trained on other weights than those of" in line
    # another architecture
    wide = make_adaptable_run(tmp_path / "wide", channels=(16, 16))
    line = refused(capsys, "sample", "--run", str(wide), "--adapter", str(adapter), "--n", "2",
                   "--out", str(tmp_path / "g.png"))  # fmt: skip
    assert "was made for another architecture" in line and "block_out_channels" in line
    assert not (tmp_path / "g.png").exists()


def test_the_page_lists_a_runs_adapters_and_samples_with_one(runs, adapter, tmp_path):
    """The run panel lists RUN/adapters/* (class name, scale, fit); a sample request names one
    of them (never a folder) and gets the CLI's images."""
    import io

    from PIL import Image
    from serve_helpers import wait_for
    from starlette.testclient import TestClient

    from ldmkit.data.transforms import to_uint8
    from ldmkit.web.app import create_app

    root = tmp_path / "root"
    shutil.copytree(runs["class"], root / "class")
    shutil.copytree(adapter, root / "class" / "adapters" / "blob")
    stranger = root / "class" / "adapters" / "other"
    shutil.copytree(adapter, stranger)
    info = json.loads((stranger / "adapter.json").read_text())
    info["base_weights_hash"] = "0" * 16
    (stranger / "adapter.json").write_text(json.dumps(info))
    with TestClient(create_app(root)) as client:
        listed = client.get("/api/run", params={"run": "class"}).json()["adapters"]
        assert [(a["name"], a["class_name"], a["fits"], a["scale"]) for a in listed] == [
            ("blob", "blob", True, 1.0), ("other", None, False, 1.0)]  # fmt: skip
        assert "other weights" in listed[1]["why"]
        request = {"run": "class", "n": 2, "classes": "blob", "seed": 3, "steps": 4}
        r = client.post("/api/sample", json=request | {"adapter": "blob", "adapter_scale": 0.5})
        assert r.status_code == 202, r.text
        job = wait_for(client, r.json()["job"]["id"])
        assert job["state"] == "done", job
        got = [client.get("/api/job/image", params={"id": job["id"], "i": i}).content
               for i in range(2)]  # fmt: skip
        # refusals: a folder instead of a name, an unknown name, one that does not fit, a scale
        # without an adapter, a scale out of range, the new class without its adapter
        for body, says in (
            ({"adapters": [str(adapter)]}, "a run's own adapters only"),
            ({"adapter": "../class"}, "unknown adapter '../class' for this run; its adapters: "
                                      "blob, other"),
            ({"adapter": "other"}, "other weights"),
            ({"adapter_scale": 1}, "adapter_scale without an adapter"),
            ({"adapter": "blob", "adapter_scale": 9}, "--adapter-scale must be"),
            ({"adapter": None}, "unknown class 'blob'"),
        ):  # fmt: skip
            r = client.post("/api/sample", json=request | body)
            assert r.status_code == 400 and says in r.json()["error"], (body, r.text)
    cli = api.sample(root / "class", n=2, classes="blob", seed=3, steps=4,
                     adapters=[str(root / "class" / "adapters" / "blob")], adapter_scales=[0.5])  # fmt: skip
    for png, image in zip(got, cli.images):
        page = torch.as_tensor(list(Image.open(io.BytesIO(png)).convert("RGB").getdata()))
        assert torch.equal(page.T.reshape(image.shape), to_uint8(image))  # the CLI's bytes


def test_the_declared_rank_limit_is_the_models():
    from ldmkit.models.lora import MAX_RANK
    from ldmkit.options import MAX_LORA_RANK

    assert MAX_LORA_RANK == MAX_RANK


def test_few_images_names_the_limits(runs, tmp_path):
    many = few_images(tmp_path / "many", n=51)
    with pytest.raises(ValueError, match="takes at most 50"):
        ft.few_images(str(many), RunFolder(runs["class"]))


def test_the_readme_commands_run(runs, tmp_path, capsys):
    """The fine-tuning section's commands, on a tiny run (few steps: the flags added last win)."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).parents[2] / "README.md").read_text()
    section = text.split("## Fine-tuning: a new class from a few images")[1].split("\n## ")[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#")[0] for line in block.splitlines() if line.startswith("ldmkit")]
    assert len(commands) == 6
    run = tmp_path / "runs" / "shapes"
    shutil.copytree(runs["class"], run)
    shutil.copytree(runs["few"], tmp_path / "my_hearts")
    for command in commands:
        argv = shlex.split(command)[1:]
        argv = [str(tmp_path / a) if a.startswith(("runs/", "my_hearts")) or a.endswith(".png")
                else a for a in argv]  # fmt: skip
        extra = (["--steps", "2", "--n", "5"] if argv[0] == "sample" else []
                 if "--merge" in argv else ["--steps", "3", "--prior-images", "3", "--quiet"])  # fmt: skip
        rc, _, err = run_cli(capsys, *argv, *extra)
        assert rc == 0, (command, err)
    assert (tmp_path / "hearts.png").is_file() and (tmp_path / "grid.png").is_file()
    assert RunFolder(tmp_path / "runs" / "shapes-heart").data_info().class_names[-1] == "heart"
    assert (tmp_path / "runs" / "heart-peft" / "pytorch_lora_weights.safetensors").is_file()


def test_merge_bakes_the_adapter_into_a_run_of_its_own(runs, adapter, tmp_path, capsys):
    # the default adapter acts on its class only: plain weights cannot, so merging is refused
    line = refused(capsys, "finetune", "--run", str(runs["class"]), "--merge", str(adapter),
                   "--out", str(tmp_path / "m0"))  # fmt: skip
    assert "acts on its class only" in line and "--gate none" in line
    assert not (tmp_path / "m0").exists()
    gated, adapter = adapter, tmp_path / "all"
    rc, _, err = run_cli(capsys, "finetune", "--run", str(runs["class"]), "--data",
                         str(runs["few"]), "--name", "blob", "--out", str(adapter), "--gate",
                         "none", *QUICK)  # fmt: skip
    assert rc == 0, err
    assert AdapterFolder(adapter).info().gate == "none" and gated != adapter
    merged = tmp_path / "merged"
    rc, out, err = run_cli(capsys, "finetune", "--run", str(runs["class"]), "--merge",
                           str(adapter), "--out", str(merged), "--adapter-scale", "0.8")  # fmt: skip
    assert rc == 0, err
    m = RunFolder(merged)
    assert m.config().unet.num_classes == 4
    assert m.data_info().class_names == ["c0", "c1", "c2", "blob"]
    kw = dict(n=4, steps=3, classes="blob,c0", fast=False)
    adapted = api.sample(runs["class"], adapters=[str(adapter)], adapter_scales=[0.8], **kw)
    baked = api.sample(merged, **kw)
    assert torch.allclose(baked.images, adapted.images, atol=1e-4, rtol=0)
    # the adapter fits the base run only; the merged run is a run of its own
    line = refused(capsys, "sample", "--run", str(merged), "--adapter", str(adapter), "--n", "2",
                   "--out", str(tmp_path / "g.png"))  # fmt: skip
    assert "another architecture" in line and "num_classes" in line
    line = refused(capsys, "finetune", "--run", str(runs["class"]), "--merge", str(adapter),
                   "--out", str(merged))  # fmt: skip
    assert "holds a run already" in line
    line = refused(capsys, "finetune", "--run", str(runs["class"]), "--out", str(tmp_path / "x"),
                   "--name", "x")  # fmt: skip
    assert (
        line == "ldmkit: error: finetune needs --data (or --merge ADAPTER to bake one into a run, "
        "or --export-peft ADAPTER)"
    )


def test_a_time_budget_ends_the_fine_tuning(runs, tmp_path):
    res = api.finetune(runs["class"], data=str(runs["few"]), name="t", out=tmp_path / "t",
                       steps=1_000_000, time_budget="3s", prior_weight=0)  # fmt: skip
    assert res.stopped_because == "time budget" and 0 < res.info.steps < 1_000_000
    assert AdapterFolder(tmp_path / "t").holds_adapter()


def test_the_class_row_learns_at_its_own_rate(runs, tmp_path):
    """Adam's first step moves every coordinate with a gradient by its group's LR: the new row
    by class_lr, the adapter's up-projections by lr (they start at zero)."""
    out = tmp_path / "lr"
    res = api.finetune(runs["class"], data=str(runs["few"]), name="lr", out=out, steps=1,
                       prior_weight=0, lr=1e-3, class_lr=0.25)  # fmt: skip
    assert res.info.class_lr == 0.25 and res.info.lr == 1e-3
    base = RunFolder(runs["class"]).load_unet().class_embed.weight.detach()
    moved = (AdapterFolder(out).tensors()["class_rows"][0] - base[:-1].mean(0)).abs()
    assert torch.allclose(moved.max(), torch.tensor(0.25), rtol=1e-3)
    ups = [v for k, v in AdapterFolder(out).tensors().items() if "lora_up" in k]
    assert max(float(u.abs().max()) for u in ups) == pytest.approx(1e-3, rel=1e-3)
    # the default: a share of the old rows' RMS
    rms = float(base[:-1].pow(2).mean().sqrt())
    assert ft.default_class_lr(RunFolder(runs["class"]).load_unet()) == pytest.approx(0.03 * rms)
