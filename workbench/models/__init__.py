"""Model definitions: MMDiT transformer, MoE feed-forward, VAE and text conditioning."""
