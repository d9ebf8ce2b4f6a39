"""Publishing: verified exports (`export`), model cards (`card`), checkpoint pushes while training runs (`push`), and
listings of local and Hub checkpoints (`checkpoints`).

Submodules are imported on use, so that `genesis-hf checkpoints` does not pay for torch when it only lists a repo.
"""
