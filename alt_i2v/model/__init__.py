"""The network: the backbone registry, the layers and losses, building and loading a model."""
