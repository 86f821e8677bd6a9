"""Helpers of the web tests: a tiny training config, a live uvicorn server, job polling."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

# a two-stage run small enough to train in seconds on one thread: 64 shapes at 16 px
TINY = [
    "image_size=16", "vae.block_out_channels=[8,8]", "vae.norm_groups=4",
    "vae.layers_per_block=1", "vae.mid_attention=false", "unet.block_out_channels=[8,16]",
    "unet.attention_resolutions=[]", "unet.norm_num_groups=4", "unet.head_dim=8",
    "unet.num_res_blocks=1", "unet.mid_attention=false", "vae_train.batch_size=8",
    "unet_train.batch_size=8", "vae_train.log_every=1", "unet_train.log_every=1",
    "preview_steps=2", "diffusion.num_timesteps=100",
]  # fmt: skip


def tiny_settings(steps: int, sample_every: int = 0) -> list[str]:
    return TINY + [
        f"vae_train.steps={steps}", f"unet_train.steps={steps}",
        f"vae_train.sample_every={sample_every}", f"unet_train.sample_every={sample_every}",
        f"vae_train.checkpoint_every={steps}", f"unet_train.checkpoint_every={steps}",
    ]  # fmt: skip


@contextlib.contextmanager
def live_server(runs: Path, **options):
    """The app served by uvicorn on a free loopback port, in a thread: yields its base URL."""
    import uvicorn

    from ldmkit.web.app import LOOPBACK, create_app, listen

    sock = listen("127.0.0.1", 0)
    app = create_app(runs, hosts=LOOPBACK, **options)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):  # up to 10 s for the server to start
            if server.started:
                break
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def wait_for(client, job_id: str, timeout: float = 60.0) -> dict:
    """Poll a job until it ends; its last state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get("/api/job", params={"id": job_id}).json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end in {timeout} s: {job}")


def tiny_config(path: Path, steps: int = 4, sample_every: int = 2) -> str:
    """`tiny_settings` as a JSON config file (what `ldmkit serve --train-config` reads)."""
    import json

    from ldmkit.recipe import settings_dict

    path.write_text(json.dumps(settings_dict(None, tiny_settings(steps, sample_every))))
    return str(path)
