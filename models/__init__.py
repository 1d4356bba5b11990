"""Model zoo. Each model is built by Hydra from configs/model/<name>.yaml."""
