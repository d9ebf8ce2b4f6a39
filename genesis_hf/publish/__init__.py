"""Stage 8, publishing: `genesis-hf export` (`export`: load a checkpoint, write it with the one model-folder writer,
`genesis_hf.model.folder`), checkpoint pushes while a run trains (`push`: a subscriber of the training events),
listings of local and Hub checkpoints (`listing`), and the playground's Hugging Face Space (`space`).

Submodules are imported on use, so that `genesis-hf checkpoints` does not pay for torch when it only lists a repo.
"""
