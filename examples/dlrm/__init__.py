"""The DLRM example jobs: `train.py` (accelerate, DDP or FSDP2) and `train_torchrec.py` (TorchRec), with the
parts they share: data, model, run folder, options, summary and report. See docs/examples.md."""
