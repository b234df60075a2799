"""RACNet inference: slice selection, routing over slices, severity and latent anchors."""
