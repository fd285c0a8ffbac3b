"""YAML recipes. Installed as `pretrain.configs` so `demo.yaml` ships inside the wheel."""
