"""Dataset modules. Each one is a DataModule built by Hydra from configs/data/<name>.yaml."""
