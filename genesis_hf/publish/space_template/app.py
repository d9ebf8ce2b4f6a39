"""The Genesis playground Space: browse a training run's checkpoints and talk to them.

What it browses comes from `GENESIS_PLAYGROUND_REPO` / `GENESIS_PLAYGROUND_RUNS` or from `playground.json` next to
this file, which `genesis-hf playground deploy` writes. A private model repo needs an `HF_TOKEN` secret in the Space
settings; it is read on the server only. Run it locally with

    GENESIS_PLAYGROUND_RUNS=outputs/pretrain python genesis_hf/publish/space_template/app.py
"""

from pathlib import Path

from genesis_hf.playground import build_app, launch_app, load_space_config, playground_from_config

demo = build_app(playground_from_config(load_space_config(Path(__file__).with_name("playground.json"))))

if __name__ == "__main__":
    # On Spaces, GRADIO_SERVER_NAME=0.0.0.0 is set by the platform; locally this stays on 127.0.0.1.
    launch_app(demo, host=None)
